"""A rank stuck in a collective (SIGSTOP) ends a `gptforge launch` job within parallel.timeout_s plus a
margin; the output names the stuck rank and holds a stack dump of every rank (gptforge.parallel.hang)."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time

import pytest

from conftest import tiny_args
from distributed._harness import job_env, started, worker_pid

pytestmark = pytest.mark.timeout(300)
TIMEOUT_S = 20
MARGIN_S = 25  # the timeout fires TIMEOUT_S after the last collective began; then dumps (~4 s) and teardown


def test_stopped_rank_ends_job_named_with_stacks(tmp_path, char_data):
    argv = [sys.executable, "-m", "gptforge", "launch", "--nproc-per-node", "2", "--", "pretrain",
            *tiny_args(tmp_path, char_data, "--train.max_steps=100000", "--train.log_every=1",
                       "--parallel.strategy=ddp", f"--parallel.timeout_s={TIMEOUT_S}")]
    env = job_env()
    env.pop("GPTFORGE_COLLECTIVE_TIMEOUT_S")  # the config's parallel.timeout_s is the one under test
    with started(argv, env) as job:
        job.wait_step(3, timeout=150)
        victim = worker_pid(job.p.pid, rank=1)
        assert victim, "rank 1's worker process not found"
        os.kill(victim, signal.SIGSTOP)
        stopped_at = time.monotonic()
        try:
            rc = job.wait(timeout=TIMEOUT_S + MARGIN_S + 60)
            took = time.monotonic() - stopped_at
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGCONT)
        out = job.out
    assert rc != 0, out[-3000:]
    assert took < TIMEOUT_S + MARGIN_S, f"the job took {took:.0f} s to end after rank 1 stopped\n{out[-3000:]}"
    # the rank that waited names the stuck one; launch's summary repeats it
    assert "gptforge hang: rank 0 waited in a collective" in out and "stuck: rank 1 (" in out, out[-4000:]
    assert "gptforge launch: node 0" in out and "a rank hung" in out, out[-3000:]
    # stack dumps: rank 0's own, and rank 1's (asked for, then woken) showing where it was in training
    own = out.index("gptforge hang: rank 0 was here when its collective timed out")
    asked = out.index("gptforge hang: rank 0 asks rank 1 (pid")
    # where in the loop each rank was depends on when SIGSTOP landed (the step's loss reduction, the stop
    # agreement, ...); what must hold is that both stacks are inside the training loop
    assert "in fit" in out[own:asked] and "Thread 0x" in out[own:asked], out[own:asked]
    dump1 = out[asked:asked + 6000]
    assert "(most recent call first)" in dump1 and "in fit" in dump1, dump1
    # nothing left behind
    assert worker_pid(job.p.pid, 0) is None and worker_pid(job.p.pid, 1) is None
