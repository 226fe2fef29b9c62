"""Elastic restart details, with real processes and gloo.

- A plain one-node `torchrun --max-restarts 1` (no `gptforge launch`): the restarted workers must not read
  the dead attempt's addresses from torchrun's shared agent store (gptforge.parallel.mesh.restart_store;
  without it most runs fail with "Gloo connectFullMesh failed ... Connection refused" or hang).
- A SIGTERM whose stop agreement fails (a dead or silent peer) ends the rank at once (gptforge.train.preempt).
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from distributed._harness import ROOT, job_env, kill_group

pytestmark = pytest.mark.timeout(150)


def test_plain_torchrun_restart_gets_fresh_process_group():
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc-per-node=2",
            "--max-restarts=1", str(ROOT / "tests" / "distributed" / "_restart_worker.py")]
    env = job_env(TORCH_DISABLE_SHARE_RDZV_TCP_STORE="0")  # torchrun's default: one store for every attempt
    p = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    try:
        out, _ = p.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        kill_group(p)
        out, _ = p.communicate()
        raise AssertionError(f"hung after the restart:\n{out[-3000:]}") from None
    finally:
        if p.poll() is None:
            kill_group(p)
    assert p.returncode == 0, out[-3000:]
    assert "attempt 0 rank 0 sum 2" in out and "attempt 0 rank 1 sum 2" in out, out[-3000:]
    assert "attempt 1 rank 0 sum 2" in out and "attempt 1 rank 1 sum 2" in out, out[-3000:]
    assert "connectFullMesh" not in out, out[-3000:]


@pytest.mark.parametrize("peer", ["dead", "silent"])
def test_signalled_rank_leaves_at_once_when_the_stop_agreement_fails(peer):
    """torchrun SIGTERMs the survivors when a worker dies: that is no preemption, the ranks cannot agree on a
    stop checkpoint. A dead peer (the all-reduce fails): exit 143 at once; a silent one: exit 143 after
    agree_s = min(10, grace_s / 2) = 10 s, not after train.grace_s = 60 s."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "distributed" / "_stop_agree_worker.py"), peer],
                              env=job_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(r),
                                          WORLD_SIZE="2"),
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True) for r in (0, 1)]
    try:
        t0 = time.monotonic()
        out, _ = procs[0].communicate(timeout=50)
        took = time.monotonic() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                kill_group(p)
            p.communicate()
    assert procs[0].returncode == 143, out[-3000:]
    assert "SIGTERM and the other ranks did not agree to stop" in out and "the step's all-reduce returned" not in out, out
    if peer == "dead":
        assert "RuntimeError" in out and took < 10, (took, out)
    else:
        assert "no answer within 10 s" in out and 9 < took < 30, (took, out)
