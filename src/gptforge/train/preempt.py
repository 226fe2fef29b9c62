"""Preemption: SIGTERM, SIGINT or SIGUSR1 (what Slurm and Kubernetes send before a kill, and Ctrl-C) stop a
run at a step boundary with a checkpoint instead of losing it.

- The handler only records the first signal and when it came; a repeat (torchrun forwards the signal a
  process may already have had, e.g. Ctrl-C reaches every process of the terminal) is ignored.
- Every optimizer step's all-reduce carries the stop flag (train.stepsync), so every rank stops after the
  same step, even when the signal reached them at different steps. The host reads it on the next step (or at
  once on a log/save step), so a run stops at most one step later than the first step that saw a signal.
- The trainer then saves a checkpoint and the process exits with ``128 + signal number`` (143 SIGTERM,
  130 SIGINT, 138 SIGUSR1): the shell's "ended by signal N" status, a failure to Slurm and Kubernetes, so
  a requeue or a Job's retry runs again (with ``--train.resume=auto``); 0 would mark the job complete.
- A watchdog ends the process ``train.grace_s`` seconds after the signal whatever it is doing (a peer
  that never reaches the collective, a save that does not finish), with the same status. A save is
  written to ``.partial`` and renamed when complete, so the previous checkpoint stays intact.

A stop signal that follows a peer's death is not a preemption: when a worker dies, torchrun's agent
SIGTERMs the others (to restart them under ``--max-restarts``, or to end the job), and no checkpoint can
be agreed on without the dead rank. A signalled rank therefore bounds the stop agreement (``agree_s``:
``min(AGREE_S, grace_s / 2)``; the ranks run in lockstep, so live peers answer within a step's skew) and
leaves at once with ``128 + signal`` and one line, without a checkpoint, when it fails or does not
complete in time; so does any error raised by a collective after the signal (a dead peer's closed
socket). The previous complete checkpoint is untouched and a restart resumes from it.

The trainer resumes by itself when torchrun restarts its workers (``TORCHELASTIC_RESTART_COUNT > 0``,
``gptforge launch --max-restarts N``): see ``elastic_restart``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
AGREE_S = 10.0  # at most this long for the ranks' stop agreement after a signal (see the module doc)


def exit_status(signum: int) -> int:
    """The documented exit status of a run stopped by ``signum``: 128 + its number."""
    return 128 + int(signum)


def elastic_restart() -> int:
    """How many times torchrun has restarted this worker group (0: the first start, or no torchrun)."""
    try:
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    except ValueError:
        return 0


def resume_setting(resume: str | None) -> str | None:
    """train.resume, or "auto" when torchrun restarted the workers (launch --max-restarts): they continue.
    None when the run starts afresh."""
    if resume in ("none", "", None):
        return "auto" if elastic_restart() > 0 else None
    return resume


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300] if text else ''}"


class StopSignals:
    """Catch the stop signals for the length of a training loop (``with StopSignals(grace_s, env) as stop``)."""

    def __init__(self, grace_s: float, env):
        self.grace_s, self.env = float(grace_s), env  # > 0: train.grace_s, checked with the config
        self.signum: int | None = None  # the first stop signal this process received
        self.received_at: float | None = None
        self.agreed: int | None = None  # the signal the ranks agreed to stop on (the largest number)
        self._old: dict = {}
        self._timer: threading.Timer | None = None
        self.agree_s = min(AGREE_S, self.grace_s / 2)

    @property
    def name(self) -> str:
        return signal.Signals(self.agreed or self.signum or signal.SIGTERM).name

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, exc_type, exc, _tb) -> None:
        """Without a signal: the old handlers back. After one: keep ignoring repeats and keep the watchdog,
        so the rest of the exit (barrier, process-group shutdown) also ends within the grace period; an
        error after the signal (a collective with a dead peer) ends the process at once."""
        if self.signum is not None:
            if exc_type is not None and issubclass(exc_type, RuntimeError) and self.env.distributed:
                self._peer_gone(_first_line(exc))  # gloo/NCCL errors are RuntimeErrors (DistBackendError)
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

    def _peer_gone(self, why: str) -> None:
        """After a stop signal the other ranks cannot agree on a checkpoint (a peer died and torchrun stops
        the rest): leave now, without one, instead of waiting out the grace period."""
        from gptforge.parallel.exit import hard_exit

        print(f"gptforge: rank {self.env.rank}: {signal.Signals(self.signum or signal.SIGTERM).name} and the other "
              f"ranks did not agree to stop ({why}): a peer is gone (torchrun stops the other workers when "
              "one dies), so no stop checkpoint; exiting, the previous checkpoint is intact and --train.resume=auto "
              "(or torchrun's restart) continues from it", file=sys.stderr, flush=True)
        hard_exit(exit_status(self.signum or signal.SIGTERM))

    @contextlib.contextmanager
    def bounded(self):
        """Around a collective that carries the stop flag (the trainer's per-step all-reduce): a rank that was
        signalled waits at most ``agree_s`` for the others, and an error of the collective after a signal is
        a gone peer (see the module doc)."""
        signalled = self.signum is not None and self.env.distributed
        bound = None
        if signalled:
            bound = threading.Timer(self.agree_s, self._peer_gone, (f"no answer within {self.agree_s:g} s",))
            bound.daemon = True
            bound.start()
        try:
            yield
        except Exception as e:  # noqa: BLE001 - a dead peer's closed socket, whatever the backend says
            if not signalled:
                raise
            self._peer_gone(_first_line(e))
        finally:
            if bound is not None:
                bound.cancel()

    def agree(self, signum: int | None) -> bool:
        """The ranks' reduced stop signal (the largest any rank had): sets ``agreed``; True to stop."""
        if signum:
            self.agreed = int(signum)
        return bool(signum)

    @property
    def status(self) -> int:
        return exit_status(self.agreed or self.signum or signal.SIGTERM)
