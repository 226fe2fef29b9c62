"""Two "machines": two network namespaces joined by a veth pair (tests/support/netns.py), `gptforge
launch` on each with its own --node-rank and --iface, 2 processes per node. The run finishes and its
losses equal one process on the same global batch. The namespaces go away even when the test fails
(the netns_pair fixture kills every process it started and deletes both namespaces)."""

from __future__ import annotations

import sys
import time

import pytest

from distributed._fixtures import base_gpt2, run_args  # noqa: F401  (fixture)
from distributed._harness import ABORT_MARKERS, assert_losses_close, job_env, read_losses
from support.netns import netns_pair  # noqa: F401  (fixture)

pytestmark = [pytest.mark.netns, pytest.mark.timeout(300)]


def test_two_nodes_match_single_process(netns_pair, tmp_path, char_data, base_gpt2):
    net = netns_pair
    master = net[0].ip
    cmd = ["pretrain", *run_args(tmp_path / "run", char_data, "--train.micro_batch=2", "--parallel.strategy=fsdp",
                                 "--train.stop_after=5")]
    procs, logs = [], []
    for i in (0, 1):
        log = open(tmp_path / f"node{i}.log", "w+")
        logs.append(log)
        argv = [sys.executable, "-m", "gptforge", "launch", "--nnodes", "2", "--node-rank", str(i),
                "--nproc-per-node", "2", "--master-addr", master, "--master-port", "29531",
                "--iface", net[i].iface, "--rdzv-timeout", "120", "--", *cmd]
        procs.append(net.popen(i, argv, env=job_env(), stdout=log, stderr=log))
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        if any(p.poll() not in (None, 0) for p in procs):
            time.sleep(15)  # let the other node report, then fail below
            break
        time.sleep(0.5)
    outs = []
    for i, (p, log) in enumerate(zip(procs, logs)):
        log.seek(0)
        outs.append(log.read())
        log.close()
    report = "\n".join(f"---- node {i} (exit {p.poll()}) ----\n" + "\n".join(o.splitlines()[-40:])
                       for i, (p, o) in enumerate(zip(procs, outs)))
    assert all(p.poll() == 0 for p in procs), report
    assert not any(m in o for o in outs for m in ABORT_MARKERS), report
    assert "sequences (micro_batch 2 x grad_accum 1 x 4 dp ranks)" in "".join(outs), report
    assert_losses_close(read_losses(tmp_path / "run"), read_losses(base_gpt2)[:5])
