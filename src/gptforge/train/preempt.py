"""Preemption: SIGTERM, SIGINT or SIGUSR1 (what Slurm and Kubernetes send before a kill, and Ctrl-C) stop a
run at a step boundary with a checkpoint instead of losing it.

- The handler only records the first signal and when it came; a repeat (torchrun forwards the signal a
  process may already have had, e.g. Ctrl-C reaches every process of the terminal) is ignored.
- After every optimizer step the ranks all-reduce (MAX) a one-element stop flag, so every rank stops
  after the same step, even when the signal reached them at different steps.
- The trainer then saves a checkpoint and the process exits with ``128 + signal number`` (143 SIGTERM,
  130 SIGINT, 138 SIGUSR1): the shell's "ended by signal N" status, a failure to Slurm and Kubernetes, so
  a requeue or a Job's retry runs again (with ``--train.resume=auto``); 0 would mark the job complete.
- A watchdog ends the process ``train.grace_s`` seconds after the signal whatever it is doing (a peer
  that never reaches the collective, a save that does not finish), with the same status. A save is
  written to ``.partial`` and renamed when complete, so the previous checkpoint stays intact.

The trainer resumes by itself when torchrun restarts its workers (``TORCHELASTIC_RESTART_COUNT > 0``,
``gptforge launch --max-restarts N``): see ``elastic_restart``.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import torch
import torch.distributed as dist

from gptforge.errors import UserError

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def exit_status(signum: int) -> int:
    """The documented exit status of a run stopped by ``signum``: 128 + its number."""
    return 128 + int(signum)


def check_grace(grace_s) -> float:
    if not isinstance(grace_s, (int, float)) or not 0 < grace_s < float("inf"):
        raise UserError(f"train.grace_s={grace_s} must be a positive number of seconds (the time a stop signal "
                        "leaves to save a checkpoint), e.g. --train.grace_s=30")
    return float(grace_s)


def elastic_restart() -> int:
    """How many times torchrun has restarted this worker group (0: the first start, or no torchrun)."""
    try:
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    except ValueError:
        return 0


class StopSignals:
    """Catch the stop signals for the length of a training loop (``with StopSignals(grace_s, env) as stop``)."""

    def __init__(self, grace_s: float, env):
        self.grace_s, self.env = check_grace(grace_s), env
        self.signum: int | None = None  # the first stop signal this process received
        self.received_at: float | None = None
        self.agreed: int | None = None  # the signal the ranks agreed to stop on (the largest number)
        self._old: dict = {}
        self._timer: threading.Timer | None = None

    @property
    def name(self) -> str:
        return signal.Signals(self.agreed or self.signum or signal.SIGTERM).name

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        """Without a signal: the old handlers back. After one: keep ignoring repeats and keep the watchdog,
        so the rest of the exit (barrier, process-group shutdown) also ends within the grace period."""
        if self.signum is not None:
            return
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()

    def _handle(self, signum, _frame) -> None:
        if self.signum is not None:
            return
        self.signum, self.received_at = signum, time.monotonic()
        self._timer = threading.Timer(self.grace_s, self._grace_over)
        self._timer.daemon = True
        self._timer.start()

    def _grace_over(self) -> None:
        from gptforge.parallel.exit import hard_exit

        rank = f"rank {self.env.rank}: " if self.env.distributed else ""
        print(f"gptforge: {rank}{signal.Signals(self.signum).name}: the grace period (train.grace_s={self.grace_s:g}) "
              "is over before the stop checkpoint was complete; exiting without it (the previous checkpoint is "
              "intact); raise train.grace_s, or resume with --train.resume=auto", file=sys.stderr, flush=True)
        hard_exit(exit_status(self.signum or signal.SIGTERM))

    def should_stop(self) -> bool:
        """Collective on every rank after each step: has any rank been signalled? Sets ``agreed``."""
        flag = self.signum or 0
        if self.env.distributed:
            t = torch.tensor([flag], dtype=torch.int32, device=self.env.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = int(t.item())
        if flag:
            self.agreed = flag
        return bool(flag)

    @property
    def status(self) -> int:
        return exit_status(self.agreed or self.signum or signal.SIGTERM)
