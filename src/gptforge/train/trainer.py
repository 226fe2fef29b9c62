"""One training loop for every stage: the objective (lm, dpo) and the loaders are plugged in.

Gradient accumulation without needless communication, AMP (bf16; fp16 with loss scaling), clipping,
LR schedule, eval averaged over ranks, NaN/inf guard, exact-resume checkpoints, rank-0 logging."""

from __future__ import annotations

import contextlib
import math
import sys
import time
import uuid
from pathlib import Path

import torch

from gptforge import checkpoint as ckpt_mod
from gptforge.data.prefetch import Prefetcher, to_device
from gptforge.errors import UserError
from gptforge.hardware import device_precision, peak_flops, set_tf32
from gptforge.model.cost import flops_per_token
from gptforge.parallel import hang
from gptforge.parallel.grad import clip_grad_norm_
from gptforge.parallel.mesh import all_reduce_mean, barrier, broadcast_object, on_main
from gptforge.parallel.localsgd import LocalSGD
from gptforge.parallel.parallelize import unwrap
from gptforge.train.checkpointing import Checkpointing
from gptforge.train.faults import StepGuard
from gptforge.train.metrics import MetricsLogger, fmt_duration
from gptforge.train.optim import build_optimizer, lr_at, peak_lrs, skip_on_device
from gptforge.train.preempt import StopSignals, check_grace, elastic_restart
from gptforge.train.stepsync import Queued, StepSync, StepValues


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def grad_sync(model, sync: bool):
    """Skip the all-reduce / reduce-scatter on non-final micro-steps (DDP no_sync, FSDP2 flag)."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    if not sync and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


def bar_at(bar, step: int) -> None:
    if bar is not None:
        bar.n = step
        bar.refresh()


class Trainer(Checkpointing):
    def __init__(self, cfg, env, model, objective, train_loader, val_loader, files: dict,
                 model_cfg, sample_fn=None, task_eval=None):
        self.cfg, self.env, self.tcfg = cfg, env, cfg.train
        self.model, self.objective = model, objective
        self.files, self.model_cfg, self.sample_fn = files, model_cfg, sample_fn
        self.task_eval = task_eval  # train.eval_tasks (run.task_evaluator): model -> {"eval/<task>/acc": ...}
        self.device = env.device
        # batches come on the device, prepared ahead; its state_dict counts only the batches handed out
        self.train_loader = Prefetcher(train_loader, env.device, cfg.train.prefetch)
        self.val_loader = val_loader
        self.precision = device_precision(self.tcfg.precision, self.device)
        self.precision_why = ""  # why train.precision=auto chose it (train.precision.train_precision; run.py)
        self.tf32 = set_tf32(self.device, self.tcfg.tf32)
        self.optimizer = build_optimizer(model, self.tcfg, self.device, self.precision)
        self.peak_lrs = peak_lrs(self.optimizer, self.tcfg)  # per param group, from the config (not a checkpoint)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None
        self.out_dir = Path(self.tcfg.out_dir)
        t = self.tcfg
        self.seqs_per_step = t.micro_batch * t.grad_accum * env.dp_size
        self.tokens_per_step = self.seqs_per_step * model_cfg.block_size
        self.total_steps = self._total_steps()
        check_grace(t.grace_s)
        self.step, self.tokens_seen = 0, 0
        # seconds spent training, across resumes: the loop's wall time less evaluations and saves (training_seconds)
        self.train_s, self._clock, self._excluded = 0.0, (time.perf_counter(), 0.0), 0.0
        self.shared_storage = True  # set by fit(): do all ranks see out_dir?
        p = cfg.parallel
        self.local_sgd = (LocalSGD(unwrap(model), p.sync_every, p.outer_lr, p.outer_momentum)
                          if p.sync_every > 1 and env.dp_size > 1 else None)
        self.history: list[float] = []
        self.last_val: float | None = None
        self.log = MetricsLogger(self.out_dir, env.is_main, t.tensorboard, t.wandb, cfg.to_dict())
        self.guard = StepGuard(t, lambda msg: self.print(msg, file=sys.stderr))
        self.run_id: str | None = None  # kept across resumes: rotation deletes only this run's checkpoints
        self.pending = None  # a checkpoint being written in the background (train.async_save)
        self.async_group = None
        self.save_stalls: list[float] = []  # seconds the loop was blocked by each save
        self.step_start, self.rolled_back_to = 0, None
        self.flops_per_token = flops_per_token(model_cfg)
        self.stepsync = StepSync(env)

    # ---- set-up ---------------------------------------------------------------------------------
    def _total_steps(self) -> int:
        t = self.tcfg
        given = [k for k in ("max_steps", "max_tokens", "epochs") if getattr(t, k) is not None]
        if len(given) > 1:
            raise UserError(f"give only one training length, not {' and '.join('train.' + k for k in given)}")
        if t.max_steps is not None:
            n = t.max_steps
        elif t.max_tokens is not None:
            n = math.ceil(t.max_tokens / self.tokens_per_step)
        elif t.epochs is not None:
            n = math.ceil(t.epochs * self.train_loader.windows_per_epoch / self.seqs_per_step)
        else:
            raise UserError("set the training length: --train.max_steps=N, --train.max_tokens=N or --train.epochs=X")
        if n < 1:
            raise UserError(f"the run would have {n} optimizer steps; raise train.max_steps/max_tokens/epochs")
        return n

    def print(self, *a, **kw) -> None:
        if self.env.is_main:
            from tqdm import tqdm

            tqdm.write(" ".join(str(x) for x in a), file=kw.get("file", sys.stdout))

    def maybe_resume(self) -> None:
        r = self.resume_setting()
        if r != self.tcfg.resume:  # torchrun restarted us (launch --max-restarts)
            self.print(f"torchrun restart {elastic_restart()}: resuming from the newest complete checkpoint")
        if r in ("none", "", None):
            return
        candidates = ckpt_mod.resume_candidates(r, self.out_dir, self.env)
        if not candidates:
            self.print(f"resume=auto: no checkpoint in {self.out_dir / 'checkpoints'}, starting from step 0")
            return
        for i, ck in enumerate(candidates):
            self._check_compatible(ck)
            try:
                extra = self.local_sgd.state_dict() if self.local_sgd else None
                state = ckpt_mod.load_checkpoint(ck, self.model, self.optimizer, self.env, extra=extra)
                if self.local_sgd:
                    self.local_sgd.load_state_dict(extra)
            except UserError as e:
                if r == "auto" and i + 1 < len(candidates):
                    self.print(f"warning: {e}; trying the previous checkpoint", file=sys.stderr)
                    continue
                raise
            self._restore(state)
            self.train_s = float(state.get("train_s") or 0.0)
            self.run_id = state.get("run_id")
            self.guard.load_state_dict(state)
            if state.get("seqs_per_step") != self.seqs_per_step:
                self.print(f"note: global batch changed from {state.get('seqs_per_step')} to "
                           f"{self.seqs_per_step} sequences per step since {ck.name}")
            self.print(f"resumed from {ck} at step {self.step}")
            return

    def _restore(self, state: dict) -> None:
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.train_loader.load_state_dict(state["loader"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    def _check_compatible(self, ck: Path) -> None:
        saved = ckpt_mod.saved_model_config(ck, self.env)
        ckpt_mod.check_same_tokenizer(ck, self.files.get("tokenizer.json"), self.env)
        now = self.model_cfg.to_dict()
        diff = [f"{k}={saved.get(k)!r} there, {now[k]!r} now" for k in now
                if k not in ("dropout", "preset") and saved.get(k) != now[k]]
        if diff:
            raise UserError(f"cannot resume from '{ck}': the model differs ({'; '.join(diff[:3])}); "
                            "use the same model config or a new train.out_dir")

        def saved_optimizer() -> str:  # a checkpoint from before train.optimizer existed: AdamW
            train = ckpt_mod.read_json(ck, "config.json").get("train") if (ck / "config.json").is_file() else None
            return train.get("optimizer", "adamw") if isinstance(train, dict) else "adamw"

        was = on_main(saved_optimizer, self.env)
        if was != self.tcfg.optimizer:
            raise UserError(f"cannot resume from '{ck}': it was trained with train.optimizer={was}, not "
                            f"{self.tcfg.optimizer} (the optimizer state differs); resume with "
                            f"--train.optimizer={was}, or start from its weights with --init-from in a new train.out_dir")

    # ---- the loop -------------------------------------------------------------------------------
    def train_step(self, stop=None) -> Queued:
        """Queue one optimizer step's work; nothing is read from the device here (train.stepsync)."""
        model, t = self.model, self.tcfg
        lr = lr_at(self.step, self.total_steps, t)  # train.lr's, logged; each group: the same schedule, its own peak
        for g, peak in zip(self.optimizer.param_groups, self.peak_lrs):
            g["lr"] = lr_at(self.step, self.total_steps, t, peak)
        loss_sum = torch.zeros((), device=self.device)
        extra: dict[str, torch.Tensor] = {}
        for micro in range(t.grad_accum):
            batch = self.train_loader.next_batch()  # already on the device (the Prefetcher moved it)
            with grad_sync(model, micro == t.grad_accum - 1), autocast(self.device, self.precision):
                loss, metrics = self.objective(model, batch)
                if micro == 0 and self.guard.inject(self.step + 1):
                    loss = loss * float("nan")  # GPTFORGE_INJECT_NAN_AT_STEP (gptforge.train.faults)
                scaled = loss / t.grad_accum
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            loss_sum += loss.detach()
            for k, v in metrics.items():
                extra[k] = extra.get(k, 0) + v.detach().float() / t.grad_accum
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        norm = clip_grad_norm_(model.parameters(), t.grad_clip if t.grad_clip > 0 else float("inf"))
        with stop.bounded() if stop is not None else contextlib.nullcontext():  # the step's one all-reduce
            vec = self.stepsync.reduce(loss_sum / t.grad_accum, extra, stop.signum if stop else None,
                                       self.pending is not None and not self.pending.done())
        finite = torch.isfinite(vec[0]) & torch.isfinite(norm.to(vec.device))
        if self.scaler:  # fp16: the scaler skips steps with inf/nan gradients and lowers its scale
            self.scaler.step(self.optimizer)
            self.scaler.update()
            finite = torch.ones((), dtype=torch.bool, device=vec.device)
        else:
            skip_on_device(self.optimizer, finite)
        self.optimizer.zero_grad(set_to_none=True)
        return self.stepsync.pack(self.step + 1, vec, 1 + len(extra), norm, finite, list(extra), lr)

    @torch.no_grad()
    def evaluate(self) -> float | None:
        if self.val_loader is None:
            return None
        self.model.eval()
        total, n = torch.zeros((), device=self.device), 0
        for batch in self.val_loader.iter_eval(self.tcfg.eval_batches):
            with autocast(self.device, self.precision):
                loss, _ = self.objective(self.model, to_device(batch, self.device))
            total += loss.float()
            n += 1
        self.model.train()
        if n == 0:
            return None
        return all_reduce_mean(total / n, self.env).item()

    def training_seconds(self) -> float:
        """Seconds spent training up to now (earlier invocations of a resumed run included): the loop's wall
        time less the evaluations (val loss, train.eval_tasks) and checkpoint saves."""
        t0, before = self._clock
        return before + time.perf_counter() - t0 - self._excluded

    def _log_step(self, loss: float, norm: float, metrics: dict, dt: float, peak: float, eta: float,
                  wait_ms: float = 0.0) -> None:
        tok_s = self.tokens_per_step / dt
        mfu = self.flops_per_token * tok_s / peak if peak else 0.0
        self.print(f"step {self.step:>{len(str(self.total_steps))}}/{self.total_steps} | loss {loss:.4f} | "
                   f"lr {metrics['lr']:.2e} | norm {norm:.3f} | {dt * 1000:.1f} ms | {tok_s:,.0f} tok/s | "
                   f"MFU {mfu * 100:.1f}% | data {wait_ms:.1f} ms | eta {fmt_duration(eta)}"
                   + "".join(f" | {k} {v:.4f}" for k, v in metrics.items() if k != "lr"))
        self.log.log(self.step, {"train/loss": loss, "train/lr": metrics["lr"], "train/grad_norm": norm,
                                 "perf/tok_s": tok_s, "perf/mfu": mfu, "perf/step_ms": dt * 1000,
                                 "perf/data_wait_ms": wait_ms,
                                 "train/bad_steps": self.guard.bad_total, "train/loss_spikes": self.guard.spikes}
                     | {f"train/{k}": v for k, v in metrics.items() if k != "lr"}
                     | {f"train/lr_{role}": g["lr"]  # train.optimizer=muon: each group's own (MuonAdamW.roles)
                        for role, g in zip(getattr(self.optimizer, "roles", ()), self.optimizer.param_groups)})

    def _observe(self, v: StepValues, stop) -> bool:
        """The host's side of step v.step, once its values are read: history, a finished background save, the
        agreed stop signal, the NaN guard. True when it rolled back (the caller drops the step in flight)."""
        self.history.append(v.loss)
        if self.pending is not None and v.saved:
            self.finish_pending()  # every rank has written it: complete (rename, rotate) now
        stop.agree(v.signal)
        action = self.guard.observe(v.step, v.loss, v.norm, v.finite)
        if action == "stop":
            self.finish_pending()
            raise UserError(f"{self.tcfg.max_bad_steps} non-finite steps in a row (to step {v.step}); stopping "
                            "(train.on_bad_steps=stop); the last checkpoint is untouched; lower train.lr, "
                            "raise train.warmup_steps or use bf16, or set train.on_bad_steps=rollback")
        if action == "rollback":
            self.rollback(v.step - self.tcfg.max_bad_steps + 1)
            return True
        return False

    def fit(self) -> dict:
        t, env = self.tcfg, self.env
        self.shared_storage = ckpt_mod.storage_is_shared(self.out_dir, env)
        if not self.shared_storage:
            self.print(f"checkpoints: the ranks do not share {self.out_dir} (machines with disks of their own): "
                       "node 0 keeps each full checkpoint, and a resume sends it to the other nodes")
        self._setup_saving()
        self.maybe_resume()
        if self.run_id is None:
            self.run_id = broadcast_object(uuid.uuid4().hex[:16], env)
        end = min(self.total_steps, t.stop_after or self.total_steps)
        if self.step >= end:  # nothing to do: say so and succeed (a requeue loop must not fail here)
            why = "finished" if end == self.total_steps else f"train.stop_after={t.stop_after} reached"
            self.print(f"the run in {self.out_dir} is already at step {self.step} of {end}: {why}, nothing to train "
                       "(raise train.max_steps to train longer)")
            self.log.close()
            return {"steps": self.step, "train_loss": None, "val_loss": None, "wall_s": 0.0, "losses": [],
                    "tok_s": 0.0, "finished": True}
        self.model.train()
        self.print(f"training {self.total_steps} steps x {self.seqs_per_step} sequences "
                   f"(micro_batch {t.micro_batch} x grad_accum {t.grad_accum} x {env.dp_size} dp ranks) = "
                   f"{self.tokens_per_step:,} tokens/step | precision {self.precision}"
                   + (f" ({self.precision_why})" if self.precision_why else "")
                   + (f" ({self.tf32})" if self.tf32 else "") + f" | device {self.device}")
        bar = None
        if env.is_main and t.progress:
            from tqdm import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True, disable=None,
                       file=sys.stderr)
        peak = peak_flops(self.device, self.precision) * env.world_size
        t_start, step_start = time.perf_counter(), self.step
        self._clock, self._excluded = (t_start, self.train_s), 0.0
        self.step_start = step_start
        window_t, window_steps = time.perf_counter(), 0
        saved_at, path = -1, None
        # SIGTERM/SIGINT/SIGUSR1: stop after a step, save, exit; the prefetch thread ends with the loop, errors too
        with StopSignals(t.grace_s, env) as stop, self.train_loader:
            queued = None  # the previous step, read at the end of this one (train.stepsync)
            while self.step < end:
                hang.progress(self.step)  # the heartbeat names a rank that stops advancing (parallel.hang)
                cur = self.train_step(stop)
                self.step += 1
                self.tokens_seen += self.tokens_per_step
                if queued is not None:  # step - 1: the device has finished it (or nearly), this step is queued
                    v, queued = queued.read(), None
                    if self._observe(v, stop):  # rolled back: this step's work is discarded
                        bar_at(bar, self.step)
                        continue
                    self.log.log(v.step, {"train/loss": v.loss})
                last = self.step == end
                save_at = bool(t.save_every and self.step % t.save_every == 0)
                eval_at = bool(t.eval_every and self.step % t.eval_every == 0)
                log_at = self.step % t.log_every == 0 or self.step == 1
                sgd_at = self.local_sgd is not None and self.local_sgd.due(self.step)
                window_steps += 1
                if bar is not None:
                    bar.update(1)
                if not (last or save_at or eval_at or log_at or sgd_at or stop.agreed):
                    cur.stage()  # read at the end of the next step: the host does not wait now
                    queued = cur
                    continue
                v = cur.read()  # this step waits for the device anyway (log, save, eval, last, stop)
                if self._observe(v, stop):
                    bar_at(bar, self.step)
                    continue
                loss, norm, metrics = v.loss, v.norm, v.metrics
                if bar is not None:
                    bar.set_postfix(loss=f"{loss:.4f}")
                stopping = stop.agreed is not None  # every rank stops after the same step
                save_due = (save_at and not self.guard.bad_in_row) or last or stopping
                if self.local_sgd is not None and (sgd_at or save_due):
                    self.local_sgd.sync()  # a checkpoint is always taken right after a synchronisation
                if log_at or last or stopping:
                    if self.device.type == "cuda":
                        torch.cuda.synchronize()
                    now = time.perf_counter()
                    dt = (now - window_t) / window_steps
                    self._log_step(loss, norm, metrics, dt, peak, (now - t_start) / max(1, self.step - step_start)
                                   * (end - self.step), self.train_loader.take_wait_s() * 1000 / window_steps)
                    window_t, window_steps = time.perf_counter(), 0
                else:
                    self.log.log(self.step, {"train/loss": loss})
                if eval_at or last:
                    if self.device.type == "cuda":
                        torch.cuda.synchronize()  # the step's kernels count as training, not as evaluation
                    t_eval, train_s = time.perf_counter(), self.training_seconds()
                    self.last_val = self.evaluate()
                    if self.last_val is not None:  # tokens and seconds trained so far: time to a loss (bench --to-loss)
                        self.print(f"step {self.step}: val loss {self.last_val:.4f}")
                        self.log.log(self.step, {"val/loss": self.last_val, "train/tokens": self.tokens_seen,
                                                 "train/seconds": train_s})
                    if self.task_eval is not None:
                        scores = self.task_eval(self.model)
                        self.print(f"step {self.step}: " + ", ".join(f"{k[5:]} {v:.4f}" for k, v in scores.items()))
                        self.log.log(self.step, scores)
                    window_t = time.perf_counter()  # keep eval out of the step time
                    self._excluded += window_t - t_eval
                if save_due:
                    t_save = time.perf_counter()
                    path = self.save(wait=stopping)  # a preemption save completes before the exit
                    saved_at = self.step
                    if path is not None:
                        self.print(f"saved checkpoint {path}")
                    window_t = time.perf_counter()
                    self._excluded += window_t - t_save
                if stopping:
                    break
            if bar is not None:
                bar.close()
            if saved_at != self.step and self.step > 0 and self.history:
                path = self.save(wait=True)
            self.finish_pending()
        wall = time.perf_counter() - t_start
        result = {"steps": self.step, "train_loss": self.history[-1] if self.history else None,
                  "val_loss": self.last_val, "wall_s": wall, "train_s": self.training_seconds(),
                  "losses": self.history, "save_stalls": self.save_stalls,
                  "bad_steps": self.guard.bad_total, "loss_spikes": self.guard.spikes,
                  "tok_s": (self.step - step_start) * self.tokens_per_step / wall if wall > 0 else 0.0}
        if stop.agreed:
            result |= {"stopped": stop.name, "status": stop.status, "checkpoint": str(path)}
        elif self.sample_fn is not None and t.sample_tokens > 0:
            text = self.sample_fn(unwrap(self.model))
            self.print("---- sample ----\n" + text + "\n----------------")
        self.log.close()
        barrier(env)
        return result

