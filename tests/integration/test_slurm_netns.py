"""`gptforge slurm` for real: a two-node Slurm cluster in two network namespaces runs the generated
sbatch script; `srun` starts one torchrun per node, the c10d rendezvous on the first node joins them
over the veth link, and the 5-step training gives the losses of a one-process run with the same global
batch. Needs root, Linux network namespaces and `slurm-wlm` + `munge` (skipped otherwise; CI's
`.ci/run` installs them). Fixture: tests/support/slurm_cluster.py.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

from conftest import read_losses, tiny_args
from support.slurm_cluster import slurm_two_nodes, slurm_unavailable_reason  # noqa: F401  (fixture)

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(slurm_unavailable_reason() is not None, reason=str(slurm_unavailable_reason())),
]

STEPS, MICRO = 5, 4


@pytest.mark.timeout(300)
def test_sbatch_two_nodes_matches_single_process(slurm_two_nodes, char_data, tmp_path):
    cluster = slurm_two_nodes
    job_dir = tmp_path / "job"  # one filesystem: a "shared" path for both nodes
    job_dir.mkdir()
    multi, single = job_dir / "run", tmp_path / "single"
    train = ["--train.max_steps=%d" % STEPS, "--train.log_every=1", "--train.grad_accum=1", "--train.seed=7"]
    script = job_dir / "train.sbatch"
    r = subprocess.run(
        [sys.executable, "-m", "gptforge", "slurm", "--nodes", "2", "--gpus-per-node", "0", "--nproc-per-node", "1",
         "--iface", cluster.iface, "--time", "00:05:00", "--join-timeout", "60", "--env", "OMP_NUM_THREADS=1",
         "--chdir", str(job_dir), "--output", str(job_dir / "slurm-%j.out"), "--out", str(script),
         "--", "pretrain", *tiny_args(multi, char_data, *train, f"--train.micro_batch={MICRO}")],
        capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr

    t0 = time.monotonic()
    job = cluster.sbatch(script, cwd=job_dir)  # sbatch runs inside node 0's namespace
    info = cluster.wait(job, timeout=150)
    out_file = job_dir / f"slurm-{job}.out"
    out = out_file.read_text(errors="replace") if out_file.exists() else "(no job output)"
    print(f"job {job}: {info.get('JobState')} exit {info.get('ExitCode')} in {time.monotonic() - t0:.0f} s\n{out[-4000:]}")
    detail = f"\n--- job output\n{out[-4000:]}\n{cluster.logs()}"
    # srun may exit 0 while tasks failed: check the state, the output and the metrics, not only the exit code
    assert info.get("JobState") == "COMPLETED" and info.get("ExitCode") == "0:0", str(info) + detail
    assert f"gptforge: job {job} on 2 nodes" in out and "rendezvous n1:29500" in out, detail
    assert "dp ranks" in out and "x 2 dp ranks" in out, detail  # both nodes' workers joined one job
    bad = [ln for ln in out.splitlines()
           if re.search(r"Traceback|ChildFailedError|srun: error|slurmstepd: error|exitcode", ln)]
    assert not bad, "\n".join(bad) + detail
    assert info.get("NodeList") == "n[1-2]", info

    # the reference: one process, no torchrun, the same global batch (2 ranks x MICRO)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "gptforge", "pretrain",
                        *tiny_args(single, char_data, *train, f"--train.micro_batch={2 * MICRO}")],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-3000:]

    a, b = read_losses(multi), read_losses(single)
    print("slurm 2 nodes:", a, "\nsingle process:", b)
    assert len(a) == len(b) == STEPS
    diff = max(abs(x - y) for x, y in zip(a, b))
    print(f"max |loss difference| {diff:.2e}")
    assert diff < 1e-5, (a, b)
