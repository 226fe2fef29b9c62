"""One training loop for every stage: the objective (lm, dpo) and the loaders are plugged in.

Gradient accumulation without needless communication, AMP (bf16; fp16 with loss scaling), clipping,
LR schedule, eval averaged over ranks, NaN/inf guard, exact-resume checkpoints, rank-0 logging."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import uuid
from pathlib import Path

import torch

from gptforge.data.prefetch import Prefetcher, to_device
from gptforge.errors import UserError
from gptforge.hardware import device_precision, peak_flops, set_tf32
from gptforge.model.cost import flops_per_token
from gptforge.parallel import hang
from gptforge.parallel.grad import clip_grad_norm_
from gptforge.parallel.mesh import all_reduce_mean, barrier, broadcast_object
from gptforge.parallel.localsgd import LocalSGD
from gptforge.parallel.parallelize import unwrap
from gptforge.train.checkpointing import CheckpointManager
from gptforge.train.faults import StepGuard
from gptforge.train.metrics import MetricsLogger, StepMeter
from gptforge.train.optim import build_optimizer, lr_at, peak_lrs, skip_on_device
from gptforge.train.preempt import StopSignals
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


@dataclasses.dataclass
class Due:
    """What the step just taken asks of the host (each component's own "is it due?"); none: the step's values
    are read at the end of the next step and the host does not wait for the device (train.stepsync)."""
    log: bool
    eval: bool
    save: bool  # train.save_every (the CheckpointManager decides once the step is read: bad steps, a stop)
    sync: bool  # local SGD's outer step
    last: bool
    stop: bool
    budget: bool = False  # train.max_tokens counted from the step's values (GRPO): read it now to stop at it

    def __bool__(self) -> bool:
        return self.log or self.eval or self.save or self.sync or self.last or self.stop or self.budget


class Trainer:
    """Owns the loop and the training state (step, tokens, data position, scaler, NaN guard: state_dict());
    each decision has one component: checkpoints the CheckpointManager (self.ckpt), log lines and step timing the
    StepMeter (self.meter), metrics the MetricsLogger (self.log), stopping StopSignals, bad steps the StepGuard,
    local SGD's outer step LocalSGD, reading the step's values StepSync."""

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
        # an objective whose rows are not block_size windows (GRPO) counts its own tokens: metrics["tokens"] (the
        # running total, tok/s); train.max_tokens is then a budget of those, checked as each step is read
        self.counts_tokens = bool(getattr(objective, "counts_tokens", False))
        self.token_budget = t.max_tokens if self.counts_tokens else None
        self.total_steps = self._total_steps()
        self.step, self.tokens_seen = 0, 0
        p = cfg.parallel
        self.local_sgd = (LocalSGD(unwrap(model), p.sync_every, p.outer_lr, p.outer_momentum)
                          if p.sync_every > 1 and env.dp_size > 1 else None)
        self.history: list[float] = []
        self.last_val: float | None = None
        self.log = MetricsLogger(self.out_dir, env.is_main, t.tensorboard, t.wandb, cfg.to_dict())
        self.guard = StepGuard(t, lambda msg: self.print(msg, file=sys.stderr))
        if not getattr(objective, "spike_check", True):  # a loss near 0 that changes sign (GRPO): no spike warning
            self.guard.factor = 0.0
        self.stepsync = StepSync(env)
        self.meter = StepMeter(self.print, self.log, self.tokens_per_step, flops_per_token(model_cfg), self.optimizer,
                               t.grad_accum * env.world_size if self.counts_tokens else 0)
        self.ckpt = CheckpointManager(t, env, model, self.optimizer, self, files, model_cfg, self.local_sgd,
                                      self.log, self.print)

    # ---- set-up ---------------------------------------------------------------------------------
    def _total_steps(self) -> int:
        t = self.tcfg
        if t.max_steps is not None:
            n = t.max_steps
        elif t.max_tokens is not None:  # a token budget (counted tokens): the steps it takes at full length
            n = math.ceil(t.max_tokens / (self.seqs_per_step * self.objective.full_tokens_per_row()
                                          if self.token_budget else self.tokens_per_step))
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

    # ---- the training state (the CheckpointManager saves and restores it) -----------------------------
    def state_dict(self) -> dict:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "loader": self.train_loader.state_dict(),
                "seqs_per_step": self.seqs_per_step, "total_steps": self.total_steps,
                "scaler": self.scaler.state_dict() if self.scaler else None,
                "val_loss": self.last_val, "train_loss": self.history[-1] if self.history else None,
                "train_s": self.meter.training_seconds()} | self.guard.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """A resume: continue at the checkpoint's step, data position and training seconds."""
        self._restore(state)
        self.meter.train_s = float(state.get("train_s") or 0.0)
        self.guard.load_state_dict(state)
        if state.get("seqs_per_step") != self.seqs_per_step:
            self.print(f"note: global batch changed from {state.get('seqs_per_step')} to "
                       f"{self.seqs_per_step} sequences per step since this checkpoint")

    def rolled_back(self, state: dict) -> None:
        """A rollback after bad steps: back to the checkpoint's step; its losses after it are forgotten."""
        self._restore(state)
        self.guard.bad_in_row = 0
        self.history = self.history[:max(0, self.step - self.meter.step_start)]
        self.meter.at(self.step)

    def _restore(self, state: dict) -> None:
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.train_loader.load_state_dict(state["loader"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

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
                                       self.ckpt.in_flight())
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

    def fit(self) -> dict:
        if (done := self._start()) is not None:
            return done
        # SIGTERM/SIGINT/SIGUSR1: stop after a step, save, exit; the prefetch thread ends with the loop, errors too
        with StopSignals(self.tcfg.grace_s, self.env) as stop, self.train_loader:
            queued = None  # the previous step, read at the end of this one (train.stepsync)
            while self.step < self.end:
                hang.progress(self.step)  # the heartbeat names a rank that stops advancing (parallel.hang)
                cur = self.train_step(stop)
                self.step += 1
                self.tokens_seen += 0 if self.counts_tokens else self.tokens_per_step  # else as it is read
                self.meter.tick()
                if queued is not None:  # step - 1: the device has finished it (or nearly), this step is queued
                    v, queued = queued.read(), None
                    if self._observe(v, stop):  # rolled back: this step's work is discarded
                        continue
                    self.log.log(v.step, {"train/loss": v.loss})
                if not (due := self._due(stop)):
                    cur.stage()  # read at the end of the next step: the host does not wait now
                    queued = cur
                    continue
                v = cur.read()  # this step waits for the device anyway (log, save, eval, last, stop, budget)
                if self._observe(v, stop):
                    continue
                if self._budget_spent():  # train.max_tokens of counted tokens: this step is the last
                    self.end, due.last = self.step, True
                self._after_step(v, due, stop.agreed is not None)  # every rank stops after the same step
                if stop.agreed is not None:
                    break
            self.meter.close()
            if self.ckpt.saved_at != self.step and self.step > 0 and self.history:
                self.ckpt.save(self.step, wait=True)
            self.ckpt.finish_pending()
        return self._finish(stop)

    def _start(self) -> dict | None:
        """Before the first step: checkpoints set up and loaded, the run's id, the start line. A result when
        there is nothing left to train."""
        t, env = self.tcfg, self.env
        self.ckpt.setup()
        self.ckpt.load()
        if self.ckpt.run_id is None:
            self.ckpt.run_id = broadcast_object(uuid.uuid4().hex[:16], env)
        self.end = min(self.total_steps, t.stop_after or self.total_steps)
        if self.token_budget is not None:  # the budget ends the run (checked as each step is read)
            self.end = t.stop_after or sys.maxsize
        if self.step >= self.end or self._budget_spent():  # nothing to do: say so and succeed (a requeue loop
            return self._nothing_left()                        # must not fail here)
        self.model.train()
        budget = (f" until {self.token_budget:,} tokens (the LR schedule: {self.total_steps} steps if every "
                  "completion ran to full length)" if self.token_budget else f" {self.total_steps} steps")
        self.print(f"training{budget} x {self.seqs_per_step} sequences "
                   f"(micro_batch {t.micro_batch} x grad_accum {t.grad_accum} x {env.dp_size} dp ranks)"
                   + ("" if self.counts_tokens else f" = {self.tokens_per_step:,} tokens/step")
                   + f" | precision {self.precision}"
                   + (f" ({self.precision_why})" if self.precision_why else "")
                   + (f" ({self.tf32})" if self.tf32 else "") + f" | device {self.device}")
        self.meter.start(self.step, min(self.end, self.total_steps), self.total_steps, env.is_main and t.progress,
                         peak_flops(self.device, self.precision) * env.world_size, self.device)
        return None

    def _nothing_left(self) -> dict:
        t = self.tcfg
        if self._budget_spent():
            at, why = "", f"train.max_tokens={t.max_tokens:,} reached ({self.tokens_seen:,} tokens)"
        else:
            at = f" of {self.end}"
            why = "finished" if self.end == self.total_steps else f"train.stop_after={t.stop_after} reached"
        self.print(f"the run in {self.out_dir} is already at step {self.step}{at}: {why}, nothing to train (raise "
                   "train.max_steps or train.max_tokens to train longer)")
        self.log.close()
        return {"steps": self.step, "train_loss": None, "val_loss": None, "wall_s": 0.0, "losses": [],
                "tok_s": 0.0, "finished": True}

    def _due(self, stop) -> Due:
        t, step = self.tcfg, self.step
        return Due(log=step % t.log_every == 0 or step == 1, eval=bool(t.eval_every and step % t.eval_every == 0),
                   save=self.ckpt.due(step),
                   sync=self.local_sgd is not None and self.local_sgd.due(step),
                   last=step == self.end, stop=stop.agreed is not None, budget=self.token_budget is not None)

    def _budget_spent(self) -> bool:
        return self.token_budget is not None and self.tokens_seen >= self.token_budget

    def _after_step(self, v: StepValues, due: Due, stopping: bool) -> None:
        """A step read on the host: each component that is due acts (local SGD, log line, evaluation, save)."""
        self.meter.postfix(v.loss)
        save = (due.save and not self.guard.bad_in_row) or due.last or stopping  # not while steps are failing
        if self.local_sgd is not None and (due.sync or save):
            self.local_sgd.sync()  # a checkpoint is always taken right after a synchronisation
        if due.log or due.last or stopping:
            self.meter.log_step(self.step, self.total_steps, v, self.guard, self.train_loader.take_wait_s())
        else:
            self.log.log(self.step, {"train/loss": v.loss})
        if due.eval or due.last:
            with self.meter.excluded():  # evaluation is not training time (nor step time)
                self._evaluate_and_log()
        if save:
            with self.meter.excluded():
                self.ckpt.save(self.step, wait=stopping)  # a preemption save completes before the exit

    def _evaluate_and_log(self) -> None:
        train_s = self.meter.training_seconds()
        self.last_val = self.evaluate()
        if self.last_val is not None:  # tokens and seconds trained so far: time to a loss (bench --to-loss)
            self.print(f"step {self.step}: val loss {self.last_val:.4f}")
            self.log.log(self.step, {"val/loss": self.last_val, "train/tokens": self.tokens_seen,
                                     "train/seconds": train_s})
        if self.task_eval is not None:
            scores = self.task_eval(self.model)
            self.print(f"step {self.step}: " + ", ".join(f"{k[5:]} {v:.4f}" for k, v in scores.items()))
            self.log.log(self.step, scores)

    def _finish(self, stop) -> dict:
        wall = self.meter.wall_s()
        result = {"steps": self.step, "train_loss": self.history[-1] if self.history else None,
                  "val_loss": self.last_val, "wall_s": wall, "train_s": self.meter.training_seconds(),
                  "losses": self.history, "save_stalls": self.ckpt.stalls,
                  "bad_steps": self.guard.bad_total, "loss_spikes": self.guard.spikes,
                  "tok_s": (self.meter.counted_tokens if self.counts_tokens else
                            (self.step - self.meter.step_start) * self.tokens_per_step) / wall if wall > 0 else 0.0}
        if stop.agreed:
            result |= {"stopped": stop.name, "status": stop.status, "checkpoint": str(self.ckpt.last_path)}
        elif self.sample_fn is not None and self.tcfg.sample_tokens > 0:
            text = self.sample_fn(unwrap(self.model))
            self.print("---- sample ----\n" + text + "\n----------------")
        self.log.close()
        barrier(self.env)
        return result

    def _observe(self, v: StepValues, stop) -> bool:
        """The host's side of step v.step, once its values are read: history, a finished background save, the
        agreed stop signal, the NaN guard. True when it rolled back (the caller drops the step in flight)."""
        self.history.append(v.loss)
        self.tokens_seen += self.meter.count(v.metrics)  # an objective's own tokens (0 for block_size windows)
        if self.ckpt.pending is not None and v.saved:
            self.ckpt.finish_pending()  # every rank has written it: complete (rename, rotate) now
        stop.agree(v.signal)
        action = self.guard.observe(v.step, v.loss, v.norm, v.finite)
        if action == "stop":
            self.ckpt.finish_pending()
            raise UserError(f"{self.tcfg.max_bad_steps} non-finite steps in a row (to step {v.step}); stopping "
                            "(train.on_bad_steps=stop); the last checkpoint is untouched; lower train.lr, "
                            "raise train.warmup_steps or use bf16, or set train.on_bad_steps=rollback")
        if action == "rollback":
            self.ckpt.rollback(self.step, v.step - self.tcfg.max_bad_steps + 1)
            return True
        return False
