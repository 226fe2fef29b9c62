"""A plain one-node `torchrun --max-restarts 1` (no `gptforge launch`): the restarted workers must not
read the dead attempt's addresses from torchrun's shared agent store (gptforge.parallel.mesh.restart_store;
without it most runs fail with "Gloo connectFullMesh failed ... Connection refused" or hang)."""

from __future__ import annotations

import subprocess
import sys

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
