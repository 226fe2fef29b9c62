"""Per-step logging: TensorBoard scalars, metrics.jsonl, wandb (MetricsLogger); the log line, progress bar,
step timing and training seconds (StepMeter)."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

import torch

from gptforge.errors import UserError


def fmt_duration(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class MetricsLogger:
    """Rank 0 only: TensorBoard (optional), metrics.jsonl (always: tests and tools read it), wandb (optional)."""

    def __init__(self, out_dir: Path, enabled: bool, tensorboard: bool, wandb: bool, config: dict):
        self.enabled = enabled
        self.tb = self.wb = None
        self.jsonl = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(out_dir / "metrics.jsonl", "a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tb"))
        if wandb:
            try:
                import wandb as wb
            except ImportError:
                raise UserError("train.wandb=true but wandb is not installed; pip install wandb") from None
            self.wb = wb.init(project="gptforge", config=config, dir=str(out_dir))

    def log(self, step: int, scalars: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, "time": time.time()} | scalars) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.wb is not None:
            self.wb.log(scalars, step=step)

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.wb is not None:
            self.wb.finish()


class StepMeter:
    """The log line (every train.log_every steps: loss, lr, norm, ms/step, tok/s, MFU (tokens/step instead for an
    objective that counts its tokens), data wait, ETA), the progress bar, and the seconds spent training across
    resumes: the loop's wall time less evaluations and checkpoint saves (`excluded()`), which bench --to-loss
    compares."""

    def __init__(self, say, log: MetricsLogger, tokens_per_step: int, flops_per_token: float, optimizer,
                 token_scale: int = 0):
        """token_scale > 0: the objective counts the tokens it runs (GRPO: prompts + completions, not block_size
        windows): its metric "tokens" of a micro-batch, averaged over the micro-batches and ranks, times
        token_scale (micro-batches x ranks) is a step's; tok/s counts those (`count`) and MFU is left out."""
        self.say, self.log, self.optimizer = say, log, optimizer
        self.tokens_per_step, self.flops_per_token = tokens_per_step, flops_per_token
        self.token_scale, self.window_tokens, self.counted_tokens = token_scale, 0.0, 0.0
        self.train_s = 0.0  # of earlier invocations (a resume sets it)
        self.bar, self.peak, self.sync = None, 0.0, False
        self.t_start = self.window_t = time.perf_counter()
        self.step_start, self.end, self.window_steps, self.excluded_s = 0, 0, 0, 0.0

    def start(self, step: int, end: int, total: int, bar: bool, peak: float, device: torch.device) -> None:
        self.step_start, self.end, self.peak, self.sync = step, end, peak, device.type == "cuda"
        if bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=step, unit="step", dynamic_ncols=True, disable=None, file=sys.stderr)
        self.t_start = self.window_t = time.perf_counter()
        self.window_steps, self.excluded_s = 0, 0.0

    def tick(self) -> None:
        self.window_steps += 1
        if self.bar is not None:
            self.bar.update(1)

    def at(self, step: int) -> None:
        """The loop went back to `step` (a rollback)."""
        if self.bar is not None:
            self.bar.n = step
            self.bar.refresh()

    def postfix(self, loss: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def wall_s(self) -> float:
        return time.perf_counter() - self.t_start

    def training_seconds(self) -> float:
        """Seconds spent training up to now (earlier invocations of a resumed run included)."""
        return self.train_s + time.perf_counter() - self.t_start - self.excluded_s

    @contextlib.contextmanager
    def excluded(self):
        """Time inside is neither training time nor step time (evaluation, checkpoint saves); the device's
        queued training work is finished first, so it counts as training."""
        if self.sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.window_t = time.perf_counter()
            self.excluded_s += self.window_t - t0

    def step_tokens(self, metrics: dict) -> int:
        """The tokens a step ran, from its values, when the objective counts them (else 0): the per-micro-batch
        mean over micro-batches and ranks times their number, rounded (the mean is float32, the count whole)."""
        return round(metrics.get("tokens", 0.0) * self.token_scale) if self.token_scale else 0

    def count(self, metrics: dict) -> int:
        """A step's values, once read on the host: -> the tokens it ran, when the objective counts them (else 0);
        tok/s counts them. The trainer's running total (train.max_tokens, checkpoints) adds this."""
        n = self.step_tokens(metrics)
        self.window_tokens += n
        self.counted_tokens += n
        return n

    def _speed(self, now: float, dt: float, metrics: dict) -> tuple[str, dict]:
        """The log line's speed fields and their scalars: tok/s and MFU for block_size windows; for an objective
        that counts its tokens, tok/s of those and the step's tokens (no MFU: its FLOPs are not 6N per token)."""
        if self.token_scale:
            tok_s = self.window_tokens / max(now - self.window_t, 1e-9)
            step_tokens = self.step_tokens(metrics)
            return (f"{tok_s:,.0f} tok/s | {step_tokens:,.0f} tok/step",
                    {"perf/tok_s": tok_s, "perf/step_tokens": step_tokens})
        tok_s = self.tokens_per_step / dt
        mfu = self.flops_per_token * tok_s / self.peak if self.peak else 0.0
        return f"{tok_s:,.0f} tok/s | MFU {mfu * 100:.1f}%", {"perf/tok_s": tok_s, "perf/mfu": mfu}

    def log_step(self, step: int, total: int, v, guard, wait_s: float) -> None:
        """The log line and scalars of step `step` (v: its StepValues), timed over the steps since the last one."""
        if self.sync:
            torch.cuda.synchronize()
        now = time.perf_counter()
        dt = (now - self.window_t) / max(1, self.window_steps)
        eta = (now - self.t_start) / max(1, step - self.step_start) * (self.end - step)
        wait_ms = wait_s * 1000 / max(1, self.window_steps)
        speed, perf = self._speed(now, dt, v.metrics)
        metrics, loss, norm = v.metrics, v.loss, v.norm
        shown = {k: x for k, x in metrics.items() if k != "lr" and not (self.token_scale and k == "tokens")}
        self.say(f"step {step:>{len(str(total))}}/{total} | loss {loss:.4f} | "
                 f"lr {metrics['lr']:.2e} | norm {norm:.3f} | {dt * 1000:.1f} ms | {speed} | "
                 f"data {wait_ms:.1f} ms | eta {fmt_duration(eta)}"
                 + "".join(f" | {k} {x:.4f}" for k, x in shown.items()))
        self.log.log(step, {"train/loss": loss, "train/lr": metrics["lr"], "train/grad_norm": norm}
                     | perf | {"perf/step_ms": dt * 1000, "perf/data_wait_ms": wait_ms,
                               "train/bad_steps": guard.bad_total, "train/loss_spikes": guard.spikes}
                     | {f"train/{k}": x for k, x in shown.items()}
                     | {f"train/lr_{role}": g["lr"]  # train.optimizer=muon: each group's own (MuonAdamW.roles)
                        for role, g in zip(getattr(self.optimizer, "roles", ()), self.optimizer.param_groups)})
        self.window_t, self.window_steps, self.window_tokens = time.perf_counter(), 0, 0.0
