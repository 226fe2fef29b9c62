"""What the ranks must agree on after a step, in ONE small tensor and ONE all-reduce, read without waiting.

Each optimizer step packs, on the device, ``[loss, objective metrics..., stop signals (one slot per signal),
save-not-done]`` into one float32 vector and all-reduces it (SUM) once; the gradient norm (already global) and
the finiteness flag are appended locally. A non-finite step's update is skipped on the device (``found_inf``
of fused AdamW, the flag GradScaler uses), so the host needs the flag only for its bookkeeping.

The host reads a step's values (``StepValues``):
- at once on the steps that wait for the device anyway: log steps (``train.log_every``, step 1), save, eval
  and local-SGD steps, the last step and a stop step;
- otherwise one step late: step s's vector is copied without blocking into a host buffer (pinned memory and
  an event on CUDA/ROCm) and read at the end of step s+1, after s+1's work is queued. The host then waits
  only for step s while the GPU works on s+1: on these steps nothing reads a device tensor.

So the host's decisions that follow a value (a stop signal, a finished background save, the NaN guard's
count towards train.max_bad_steps) may come one step later than the value: every rank reads the same
reduced vector at the same point, so all ranks still act after the same step."""

from __future__ import annotations

import signal
from dataclasses import dataclass

import torch
import torch.distributed as dist

from gptforge.train.preempt import STOP_SIGNALS


@dataclass
class StepValues:
    step: int
    loss: float
    norm: float
    finite: bool
    metrics: dict[str, float]
    signal: int | None  # the largest stop signal any rank had when the step ran (the ranks' agreement)
    saved: bool  # every rank had finished writing the background save pending when the step ran


class Queued:
    """One step's packed values on the device; read() -> StepValues (stage() first to read without a wait)."""

    def __init__(self, step: int, out: torch.Tensor, keys: list[str], lr: float, buf: torch.Tensor | None):
        self.step, self.out, self.keys, self.lr, self.buf = step, out, keys, lr, buf
        self.event, self.staged = None, False

    def stage(self) -> None:
        """Start the copy to the host buffer (non-blocking on a GPU); read() later waits for this step only."""
        self.buf.copy_(self.out, non_blocking=True)
        self.staged = True
        if self.out.device.type == "cuda":
            self.event = torch.cuda.Event()
            self.event.record()

    def read(self) -> StepValues:
        if self.staged:
            if self.event is not None:
                self.event.synchronize()  # waits for this step's copy, not for the steps queued after it
            v = self.buf.tolist()
        else:
            v = self.out.tolist()  # the one device read of a log/save/eval step (it waits anyway)
        m = len(self.keys)
        signals = v[1 + m:1 + m + len(STOP_SIGNALS)]
        got = [int(s) for s, n in zip(STOP_SIGNALS, signals) if n > 0]
        return StepValues(self.step, v[0], v[-2], v[-1] > 0, {k: x for k, x in zip(self.keys, v[1:1 + m])}
                          | {"lr": self.lr}, max(got) if got else None, v[1 + m + len(STOP_SIGNALS)] == 0)


class StepSync:
    def __init__(self, env):
        self.env = env
        self.bufs: dict[int, torch.Tensor] = {}

    def reduce(self, loss: torch.Tensor, metrics: dict[str, torch.Tensor], signum: int | None,
               save_pending: bool) -> torch.Tensor:
        """[loss, metrics, signal slots, save-not-done] summed over the ranks (one collective)."""
        flags = torch.zeros(len(STOP_SIGNALS) + 1, device=loss.device)
        if signum is not None:
            flags[STOP_SIGNALS.index(signal.Signals(signum))].fill_(1.0)  # a kernel argument: no copy, no wait
        if save_pending:
            flags[-1].fill_(1.0)
        vec = torch.cat([loss.float().reshape(1), *(v.float().reshape(1) for v in metrics.values()), flags])
        if self.env.distributed:
            dist.all_reduce(vec, op=dist.ReduceOp.SUM)
        return vec

    def pack(self, step: int, vec: torch.Tensor, n_mean: int, norm: torch.Tensor, finite: torch.Tensor,
             keys: list[str], lr: float) -> Queued:
        """The reduced vector with its first n_mean entries averaged over the ranks, the norm and the flag."""
        head = vec[:n_mean] / self.env.world_size if self.env.distributed else vec[:n_mean]
        out = torch.cat([head, vec[n_mean:], norm.float().reshape(1).to(vec.device), finite.float().reshape(1)])
        buf = self.bufs.get(step % 2)
        if buf is None or buf.numel() != out.numel():
            buf = torch.empty(out.numel(), dtype=out.dtype, pin_memory=out.device.type == "cuda")
            self.bufs[step % 2] = buf
        return Queued(step, out, keys, lr, buf)
