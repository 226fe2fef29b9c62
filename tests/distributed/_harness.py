"""Run real multi-process jobs (torchrun / gptforge launch) from tests, and judge them strictly.

Every job runs in its own session with a timeout; on timeout or test failure its whole process group
is killed. `check_clean` fails on a non-zero exit *and* on gloo's exit abort ("terminate called",
"Aborted", SIGABRT), so a crash after a successful run is never passed off as success."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ABORT_MARKERS = ("terminate called", "Aborted", "SIGABRT", "Signal 6", "core dumped")


@dataclass
class Job:
    argv: list[str]
    returncode: int
    output: str  # stdout + stderr, interleaved
    wall_s: float

    def __str__(self) -> str:
        tail = "\n".join(self.output.splitlines()[-60:])
        return f"$ {' '.join(self.argv)}\nexit {self.returncode} after {self.wall_s:.1f} s\n{tail}"


def job_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "GPTFORGE_COLLECTIVE_TIMEOUT_S": "30",
                "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "5", "PYTHONPATH": str(ROOT / "src")})
    env.pop("WORLD_SIZE", None), env.pop("RANK", None), env.pop("LOCAL_RANK", None)
    env.update(extra)
    return env


def kill_group(p: subprocess.Popen) -> None:
    """SIGTERM the job's process group, then SIGKILL whatever is left (the netns fixture's own)."""
    from support.netns import TwoNodes

    TwoNodes.kill(p, grace=5.0)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(p.pid, signal.SIGKILL)


def start(argv: list[str], env: dict | None = None, cwd: str | Path | None = None) -> subprocess.Popen:
    return subprocess.Popen(argv, env=env or job_env(), cwd=cwd or ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(p: subprocess.Popen, timeout: float, t0: float) -> Job:
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(p)
        out, _ = p.communicate()
        raise AssertionError(f"job timed out after {timeout} s and was killed:\n$ {' '.join(p.args)}\n"
                             + "\n".join((out or "").splitlines()[-60:])) from None
    except BaseException:
        kill_group(p)
        raise
    finally:
        # torchrun's workers are in the same group: never leave one behind
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGKILL)
    return Job(list(map(str, p.args)), p.returncode, out or "", time.monotonic() - t0)


def run(argv: list[str], timeout: float = 180, env: dict | None = None, cwd=None) -> Job:
    t0 = time.monotonic()
    return finish(start(argv, env, cwd), timeout, t0)


def torchrun_argv(nproc: int, target: list[str]) -> list[str]:
    """`python -m torch.distributed.run --standalone --nproc-per-node=N` + target (`-m gptforge ...` or a script)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "--max-restarts=0", *target]


def torchrun(nproc: int, cmd: list[str], timeout: float = 180, env: dict | None = None, check: bool = True) -> Job:
    """torchrun N gptforge workers: cmd is e.g. ["pretrain", "--train.max_steps=5", ...]."""
    job = run(torchrun_argv(nproc, ["-m", "gptforge", *cmd]), timeout, env)
    if check:
        check_clean(job)
    return job


def check_clean(job: Job) -> None:
    assert job.returncode == 0, f"job failed:\n{job}"
    bad = [m for m in ABORT_MARKERS if m in job.output]
    assert not bad, f"job exited 0 but its output shows an abort ({bad}):\n{job}"


def read_losses(run_dir) -> list[float]:
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in rows if "train/loss" in r]


def assert_losses_close(got: list[float], want: list[float], tol: float = 1e-5) -> None:
    assert len(got) == len(want), f"{len(got)} losses, expected {len(want)}: {got} vs {want}"
    diffs = [abs(a - b) for a, b in zip(got, want)]
    assert max(diffs) <= tol, f"losses differ by up to {max(diffs):.2e} (> {tol}):\n got  {got}\n want {want}"
