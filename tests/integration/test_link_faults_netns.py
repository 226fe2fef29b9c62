"""The link between two nodes cut mid-run.

Two network-namespace "machines" (tests/support/netns.py), each with its own working folder (its own
"disk": run folder, copy of the data) and its own GPTFORGE_CACHE, run `gptforge launch ... -- pretrain`
with `--parallel.timeout_s=T` and periodic checkpoints. Once node 0 holds a checkpoint, node 1's
interface goes down (`ip link set IF down` inside its namespace). Both nodes must exit non-zero within
T + 30 s, each naming the peer it lost, and leave no half-written checkpoint that looks complete.
After the link is back, `--train.resume=auto` continues exactly (needs checkpoints without a shared
disk: node 0 holds the full checkpoint and sends it to node 1).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import tiny_args
from distributed._harness import assert_losses_close, job_env
from support.netns import netns_unavailable_reason, two_nodes

pytestmark = [pytest.mark.netns, pytest.mark.slow, pytest.mark.timeout(600),
              pytest.mark.skipif(netns_unavailable_reason() is not None, reason=str(netns_unavailable_reason()))]

T = 20  # parallel.timeout_s
PORT = 29587
STEP_RE = re.compile(r"^step\s+(\d+)/", re.M)


def node_env(home: Path) -> dict[str, str]:
    env = job_env(GPTFORGE_CACHE=str(home / "cache"))
    env.pop("GPTFORGE_COLLECTIVE_TIMEOUT_S", None)  # parallel.timeout_s decides
    return env


def train_args(*extra: str) -> list[str]:
    return ["pretrain", *tiny_args("runs/x", "data", "--train.max_steps=100000", "--train.schedule=constant",
                                   "--train.save_every=20", "--train.log_every=1",
                                   f"--parallel.timeout_s={T}", *extra)]


def launch(net, i: int, home: Path, log: Path, *extra: str) -> subprocess.Popen:
    argv = [sys.executable, "-m", "gptforge", "launch", "--nnodes", "2", "--node-rank", str(i),
            "--nproc-per-node", "1", "--master-addr", net[0].ip, "--master-port", str(PORT),
            "--iface", net[i].iface, "--rdzv-timeout", "120", "--", *train_args(*extra)]
    f = open(log, "w")
    return net.popen(i, argv, env=node_env(home), cwd=home, stdout=f, stderr=subprocess.STDOUT)


def complete_steps(run: Path) -> list[int]:
    ck = run / "checkpoints"
    return sorted(int(p.name[5:]) for p in ck.glob("step_*") if p.name[5:].isdigit()) if ck.is_dir() else []


def losses_by_step(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def wait_all(procs, deadline: float) -> list[float | None]:
    """Seconds from now until each process ended (None: still running at the deadline)."""
    t0, ended = time.monotonic(), [None] * len(procs)
    while time.monotonic() < deadline and any(e is None for e in ended):
        for k, p in enumerate(procs):
            if ended[k] is None and p.poll() is not None:
                ended[k] = time.monotonic() - t0
        time.sleep(0.2)
    return ended


@pytest.fixture(scope="module")
def cut_run(tmp_path_factory, char_data):
    """Both nodes train, node 1's link goes down after node 0's first checkpoint; yields what happened."""
    root = tmp_path_factory.mktemp("linkcut")
    homes = [root / f"node{i}" for i in (0, 1)]
    for h in homes:
        h.mkdir()
        shutil.copytree(char_data, h / "data")  # each node its own copy: nothing shared
    with two_nodes(subnet="10.83.0") as net:
        logs = [root / f"node{i}.log" for i in (0, 1)]
        procs = [launch(net, i, homes[i], logs[i]) for i in (1, 0)][::-1]
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            steps = complete_steps(homes[0] / "runs/x")
            seen = [int(s) for s in STEP_RE.findall(logs[0].read_text())]
            if (steps and seen and max(seen) >= steps[-1] + 5) or any(p.poll() is not None for p in procs):
                break
            time.sleep(0.3)
        assert all(p.poll() is None for p in procs), "a node ended before the cut:\n" + logs[0].read_text()[-3000:]
        assert complete_steps(homes[0] / "runs/x"), "no checkpoint on node 0 within 240 s"
        net.run(1, ["ip", "link", "set", net[1].iface, "down"], check=True)
        ended = wait_all(procs, time.monotonic() + T + 90)
        for p in procs:
            net.kill(p)
        outs = [log.read_text() for log in logs]
        net.run(1, ["ip", "link", "set", net[1].iface, "up"], check=True)
        yield dict(net=net, homes=homes, procs=procs, ended=ended, outs=outs, root=root)


def report(r) -> str:
    return "\n".join(f"---- node {i} (exit {p.returncode}, ended {e}) ----\n" + "\n".join(o.splitlines()[-30:])
                     for i, (p, e, o) in enumerate(zip(r["procs"], r["ended"], r["outs"])))


def test_both_nodes_exit_in_time_naming_the_lost_peer(cut_run):
    r, net = cut_run, cut_run["net"]
    assert "parallel: ddp across 2 nodes x 1 rank" in r["outs"][0], report(r)  # the default across nodes
    for i in (0, 1):
        assert r["ended"][i] is not None and r["ended"][i] <= T + 30, report(r)
        assert r["procs"][i].returncode not in (0, None), report(r)
        lines = [ln for ln in r["outs"][i].splitlines()
                 if ln.startswith("gptforge launch:") and "unreachable from this node" in ln]
        assert len(lines) == 1, report(r)
        peer = net[1 - i].ip
        assert f"node {1 - i} ({peer})" in lines[0] or peer in lines[0], report(r)


def test_no_half_written_checkpoint_looks_complete(cut_run):
    for home in cut_run["homes"]:
        ck = home / "runs/x/checkpoints"
        for d in ck.glob("step_*") if ck.is_dir() else []:
            if not d.name.endswith(".partial"):
                assert (d / "trainer_state.json").is_file() and (d / "config.json").is_file(), (d, list(d.iterdir()))


def test_node0_checkpoint_intact_and_resume_continues_exactly(cut_run, char_data, tmp_path):
    from gptforge.checkpoint import list_checkpoints, load_model
    from gptforge.cli import main

    r, net = cut_run, cut_run["net"]
    run0 = r["homes"][0] / "runs/x"
    last = list_checkpoints(run0)[-1]
    load_model(last)  # node 0's copy alone is a whole checkpoint
    step = int(last.name[5:])
    stop = step + 4
    base = tmp_path / "base"
    assert main(["pretrain", *tiny_args(base, char_data, "--train.max_steps=100000", "--train.schedule=constant",
                                        "--train.log_every=1", "--train.micro_batch=8",
                                        f"--train.stop_after={stop}")]) == 0
    # the cut run's metrics (node 0 only: rank 0 logs) end at the cut; the resumed run appends its own
    (run0 / "metrics.jsonl").rename(run0 / "metrics.cut.jsonl")
    assert not (r["homes"][1] / "runs/x/checkpoints").exists() or not list_checkpoints(r["homes"][1] / "runs/x")
    logs = [r["root"] / f"resume{i}.log" for i in (0, 1)]
    procs = [launch(net, i, r["homes"][i], logs[i], "--train.resume=auto", f"--train.stop_after={stop}")
             for i in (0, 1)]
    ended = wait_all(procs, time.monotonic() + 240)
    outs = [log.read_text()[-3000:] for log in logs]
    assert all(e is not None and p.returncode == 0 for p, e in zip(procs, ended)), "\n".join(outs)
    got, want = losses_by_step(run0), losses_by_step(base)
    steps = list(range(step + 1, stop + 1))
    assert sorted(got) == steps, (sorted(got), step)
    assert_losses_close([got[s] for s in steps], [want[s] for s in steps])
