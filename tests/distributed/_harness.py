"""Run real multi-process jobs (torchrun / gptforge launch) from tests, and judge them strictly.

Every job runs in its own session with a timeout; on timeout or test failure its whole process group
is killed. `check_clean` fails on a non-zero exit *and* on gloo's exit abort ("terminate called",
"Aborted", SIGABRT), so a crash after a successful run is never passed off as success."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import re
import subprocess
import sys
import threading
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


def launch(nproc: int, cmd: list[str], timeout: float = 180, env: dict | None = None) -> Job:
    """`gptforge launch --nproc-per-node N --port P -- CMD` on a free port (launch builds and runs torchrun)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    job = run([sys.executable, "-m", "gptforge", "launch", "--nproc-per-node", str(nproc), "--port", str(port), "--",
               *cmd], timeout, env)
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


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def worker_pid(root: int, rank: int) -> int | None:
    """The pid of torchrun's worker of this rank below process `root` (not torchrun itself)."""
    for pid in descendants(root):
        try:
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and any(e.startswith(b"TORCHELASTIC_RUN_ID=") for e in env):
            cmd = open(f"/proc/{pid}/cmdline", "rb").read()
            if b"torch.distributed.run" not in cmd:
                return pid
    return None


class Proc:
    """A process in its own session; its output collected by a thread; waits for lines; killed on exit."""

    def __init__(self, argv: list[str], env: dict | None = None):
        self.p = start(argv, env)
        self.lines: list[str] = []
        self.t = threading.Thread(target=self._read, daemon=True)
        self.t.start()

    def _read(self) -> None:
        for line in self.p.stdout:
            self.lines.append(line)
        self.p.stdout.close()

    @property
    def out(self) -> str:
        return "".join(self.lines)

    def wait_step(self, at_least: int, timeout: float = 120) -> int:
        """Wait until the training log shows step `at_least` (or later); fails if the process ends first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            steps = [int(m.group(1)) for m in map(re.compile(r"^step +(\d+)/").match, list(self.lines)) if m]
            if steps and max(steps) >= at_least:
                return max(steps)
            assert self.p.poll() is None, f"ended early ({self.p.returncode}):\n{self.out[-3000:]}"
            time.sleep(0.05)
        raise AssertionError(f"no step {at_least} in {timeout} s:\n{self.out[-3000:]}")

    def wait(self, timeout: float = 120) -> int:
        try:
            rc = self.p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after {timeout} s:\n{self.out[-3000:]}") from None
        self.t.join(timeout=10)
        return rc

    def close(self) -> None:
        if self.p.poll() is None:
            kill_group(self.p)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.p.pid, signal.SIGKILL)  # torchrun's workers are in the same group


@contextlib.contextmanager
def started(argv: list[str], env: dict | None = None):
    proc = Proc(argv, env)
    try:
        yield proc
    finally:
        proc.close()
