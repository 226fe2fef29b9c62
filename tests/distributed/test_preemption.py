"""Preemption and elastic restart, with real processes and real signals (gptforge.train.preempt).

- SIGTERM / SIGINT / SIGUSR1 to a single `gptforge pretrain` and to `gptforge launch` with 2 workers:
  exit status 128 + signal, a checkpoint at the step it stopped, and a resume gives the losses of an
  uninterrupted run.
- A signal to one rank only: the other stops at the same step (the all-reduced stop flag).
- The grace period: with train.grace_s too short for the step, the process exits anyway, the previous
  checkpoint intact.
- kill -9 of one worker under `launch --max-restarts 1`: torchrun restarts the workers, they resume from
  the newest complete checkpoint and the run ends with the uninterrupted losses.

Every run uses a global batch of 8 sequences (one process x 8, or 2 workers x 4), so one single-process
baseline serves all of them. Losses are read from metrics.jsonl (per step; a resumed step's row wins).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import tiny_args
from distributed import _harness as harness
from distributed._harness import job_env, worker_pid

pytestmark = pytest.mark.timeout(300)

MAX_STEPS = 100_000  # the LR schedule's length: runs end by signal or by --train.stop_after
SIGNALS = [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1]


def args(out, data, *extra, micro=8):
    return tiny_args(out, data, f"--train.max_steps={MAX_STEPS}", "--train.log_every=1", "--train.warmup_steps=5",
                     f"--train.micro_batch={micro}", *extra)


def losses_by_step(run_dir: Path) -> dict[int, float]:
    out: dict[int, float] = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "train/loss" in row:
            out[row["step"]] = row["train/loss"]  # a step redone after a resume: its last row wins
    return out


def started(argv, env=None):
    return harness.started(argv, env or job_env(TORCH_ELASTIC_SHUTDOWN_TIMEOUT="40"))


def pretrain(*a) -> list[str]:
    return [sys.executable, "-m", "gptforge", "pretrain", *a]


def launch(*a, restarts: int = 0) -> list[str]:
    return [sys.executable, "-m", "gptforge", "launch", "--nproc-per-node", "2", "--max-restarts", str(restarts),
            "--", "pretrain", *a, "--parallel.strategy=ddp"]


def run_ok(argv, timeout=180) -> str:
    with started(argv) as p:
        rc = p.wait(timeout)
        assert rc == 0, p.out[-3000:]
        return p.out


class Baseline:
    """One uninterrupted single-process run, extended on demand (a longer one when a test needs more steps)."""

    def __init__(self, root: Path, data: Path):
        self.root, self.data, self.losses, self.n = root, data, {}, 0

    def upto(self, steps: int) -> dict[int, float]:
        if steps > self.n:
            out = self.root / f"base{steps}"
            run_ok(pretrain(*args(out, self.data, f"--train.stop_after={steps}")))
            self.losses, self.n = losses_by_step(out), steps
        return {s: self.losses[s] for s in range(1, steps + 1)}


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, char_data) -> Baseline:
    b = Baseline(tmp_path_factory.mktemp("preempt_base"), char_data)
    b.upto(40)
    return b


def stopped_line(out: str) -> tuple[str, int, str]:
    m = re.search(r"pretrain: stopped by (SIG\w+) at step (\d+), saved checkpoint (\S+); resume with "
                  r"--train\.resume=auto \(exit status (\d+)\)", out)
    assert m, out[-3000:]
    return m.group(1), int(m.group(2)), m.group(3)


def check_stop_and_resume(run: Path, data: Path, out: str, rc: int, sig: signal.Signals, baseline: Baseline,
                          resume_argv) -> None:
    assert rc == 128 + sig, f"exit {rc}, expected {128 + sig}:\n{out[-3000:]}"
    name, step, ckpt = stopped_line(out)
    assert name == sig.name
    assert Path(ckpt) == run / "checkpoints" / f"step_{step:07d}" and (Path(ckpt) / ".metadata").is_file()
    assert "Traceback" not in out, out[-3000:]
    logged = losses_by_step(run)
    assert max(logged) == step, f"logged up to {max(logged)}, stopped at {step}"
    end = step + 3
    resumed = run_ok(resume_argv(run, data, "--train.resume=auto", f"--train.stop_after={end}"))
    assert f"resumed from {ckpt} at step {step}" in resumed, resumed[-3000:]
    got, want = losses_by_step(run), baseline.upto(end)
    assert sorted(got) == list(range(1, end + 1))
    diff = max(abs(got[s] - want[s]) for s in want)
    assert diff < 1e-5, f"losses differ from the uninterrupted run by {diff:.2e}:\n{got}\n{want}"


@pytest.mark.parametrize("sig", SIGNALS, ids=[s.name for s in SIGNALS])
def test_signal_single_process(tmp_path, char_data, baseline, sig):
    run = tmp_path / "run"
    with started(pretrain(*args(run, char_data))) as p:
        p.wait_step(3)
        t0 = time.monotonic()
        os.kill(p.p.pid, sig)
        rc = p.wait(60)
        took = time.monotonic() - t0
        out = p.out
    assert took < 30, f"took {took:.1f} s to stop (grace 30 s)"
    check_stop_and_resume(run, char_data, out, rc, sig, baseline,
                          lambda r, d, *e: pretrain(*args(r, d, *e)))


@pytest.mark.parametrize("sig", SIGNALS, ids=[s.name for s in SIGNALS])
def test_signal_launch_two_workers(tmp_path, char_data, baseline, sig):
    run = tmp_path / "run"
    with started(launch(*args(run, char_data, micro=4))) as p:
        p.wait_step(3)
        os.kill(p.p.pid, sig)  # to `gptforge launch` only: it passes the signal on through torchrun
        rc = p.wait(90)
        out = p.out
    assert f"gptforge launch: node 0: {sig.name} passed to the workers; they saved a checkpoint" in out, out[-3000:]
    check_stop_and_resume(run, char_data, out, rc, sig, baseline,
                          lambda r, d, *e: launch(*args(r, d, *e, micro=4)))


@pytest.mark.parametrize("log_every", [1, 5], ids=["read_every_step", "read_one_step_late"])
def test_one_rank_signalled_both_stop_at_the_same_step(tmp_path, char_data, baseline, log_every):
    """SIGTERM to rank 1's process only: rank 0 (never signalled) stops after the same step and says so. With
    train.log_every=5 most steps are read one step late (train.stepsync): the agreement still holds."""
    run = tmp_path / "run"
    a = [x for x in args(run, char_data, micro=4) if not x.startswith("--train.log_every")]
    with started(launch(*a, f"--train.log_every={log_every}")) as p:
        p.wait_step(5 if log_every > 1 else 3)
        victim = worker_pid(p.p.pid, rank=1)
        assert victim, "rank 1's worker not found"
        os.kill(victim, signal.SIGTERM)
        rc = p.wait(90)
        out = p.out
    name, step, ckpt = stopped_line(out)  # printed by rank 0, which got no signal itself
    assert name == "SIGTERM" and rc != 0
    assert sorted(os.listdir(run / "checkpoints")) == [f"step_{step:07d}"]
    resumed = run_ok(launch(*args(run, char_data, "--train.resume=auto", f"--train.stop_after={step + 2}", micro=4)))
    assert f"at step {step}" in resumed
    got, want = losses_by_step(run), baseline.upto(step + 2)
    assert max(abs(got[s] - want[s]) for s in want) < 1e-5, (got, want)


def test_grace_period_exits_anyway_previous_checkpoint_intact(tmp_path, char_data):
    """train.grace_s shorter than a step: the watchdog ends the process with 143, no new checkpoint, the one
    saved before is complete and a resume starts from it."""
    run = tmp_path / "run"
    with started(pretrain(*args(run, char_data, "--train.save_every=2", "--train.grace_s=0.001"))) as p:
        p.wait_step(3)
        os.kill(p.p.pid, signal.SIGTERM)
        rc = p.wait(60)
        out = p.out
    assert rc == 143, out[-3000:]
    assert "the grace period (train.grace_s=0.001) is over before the stop checkpoint was complete" in out, out[-2000:]
    assert "stopped by SIGTERM" not in out
    done = sorted(d for d in os.listdir(run / "checkpoints") if not d.endswith(".partial"))
    assert done and all((run / "checkpoints" / d / ".metadata").is_file() for d in done)
    newest = int(done[-1].split("_")[1])
    resumed = run_ok(pretrain(*args(run, char_data, "--train.resume=auto", f"--train.stop_after={newest + 1}")))
    assert f"at step {newest}" in resumed


@pytest.mark.timeout(240)
def test_kill9_worker_restarts_and_matches(tmp_path, char_data, baseline):
    """kill -9 of rank 1 under --max-restarts 1: torchrun SIGTERMs rank 0, which leaves at once (a SIGTERM
    after a peer's death is no preemption: no stop checkpoint to agree on), torchrun restarts both workers
    with a fresh store (the shared one held the dead attempt's addresses: gloo connectFullMesh refused),
    they resume from the newest complete checkpoint, and the run ends with the uninterrupted losses."""
    run, end, grace = tmp_path / "run", 40, 120
    argv = launch(*args(run, char_data, "--train.save_every=2", f"--train.stop_after={end}",
                        f"--train.grace_s={grace}", micro=4), restarts=1)
    # torchrun waits grace + 10 s before it kills, as `launch` sets it: a survivor that treated torchrun's
    # SIGTERM as a preemption would hold the restart up for the whole grace period
    env = job_env(TORCH_ELASTIC_SHUTDOWN_TIMEOUT=str(grace + 10), GPTFORGE_COLLECTIVE_TIMEOUT_S="90")
    with started(argv, env) as p:
        p.wait_step(6)
        victim, survivor = worker_pid(p.p.pid, rank=1), worker_pid(p.p.pid, rank=0)
        assert victim and survivor, "the workers were not found"
        os.kill(victim, signal.SIGKILL)
        t0 = time.monotonic()
        while _alive(survivor) and time.monotonic() - t0 < 60:
            time.sleep(0.1)
        survivor_s = time.monotonic() - t0
        rc = p.wait(150)
        out = p.out
    print(f"rank 0 left {survivor_s:.1f} s after rank 1's kill; the survivor said: "
          + "; ".join(ln.strip()[:160] for ln in out.splitlines() if "did not agree to stop" in ln or "Error:" in ln))
    assert survivor_s < 30, f"rank 0 still ran {survivor_s:.0f} s after its peer died:\n{out[-4000:]}"
    assert rc == 0, out[-4000:]
    assert "connectFullMesh" not in out, out[-4000:]
    assert "torchrun restart 1: resuming from the newest complete checkpoint" in out, out[-4000:]
    m = re.search(r"resumed from (\S+) at step (\d+)", out)
    assert m and 0 < int(m.group(2)) < end, out[-4000:]
    # the same 2-worker run without the kill: a restarted run must give exactly its losses
    ref = tmp_path / "uninterrupted"
    run_ok(launch(*args(ref, char_data, "--train.save_every=2", f"--train.stop_after={end}", micro=4)))
    got, want = losses_by_step(run), losses_by_step(ref)
    assert sorted(got) == sorted(want) == list(range(1, end + 1))
    assert got == want, [(s, got[s], want[s]) for s in want if got[s] != want[s]]
    # and both are the single-process run's (global batch 8) up to float summation order
    assert max(abs(got[s] - v) for s, v in baseline.upto(end).items()) < 1e-4


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for torchrun to reap it counts as ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def test_bad_grace_and_max_restarts_are_one_line(tmp_path, char_data):
    r = subprocess.run(pretrain(*args(tmp_path / "r", char_data, "--train.grace_s=0")), capture_output=True,
                       text=True, timeout=120, env=job_env())
    assert r.returncode == 2 and "config key 'train.grace_s'" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = subprocess.run([sys.executable, "-m", "gptforge", "launch", "--max-restarts", "-1", "--", "pretrain"],
                       capture_output=True, text=True, timeout=60, env=job_env())
    assert r.returncode == 2 and "--max-restarts" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
