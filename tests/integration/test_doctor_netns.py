"""`gptforge doctor` (and `gptforge launch`) between two network-namespace "nodes" (tests/support/netns.py).

Needs root and `ip`; skipped otherwise. Every process runs inside a namespace (never connect to a
namespace address from the root namespace). About a minute on 2 cores.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support.netns import netns_unavailable_reason, two_nodes

pytestmark = [pytest.mark.netns,
              pytest.mark.skipif(netns_unavailable_reason() is not None, reason=str(netns_unavailable_reason()))]

DOCTOR = [sys.executable, "-m", "gptforge", "doctor"]


def doctor_argv(net, i: int, *extra: str, iface: str | None = None, master: str | None = None,
                port: int = 29500, wait: float = 60) -> list[str]:
    return [*DOCTOR, "--nnodes", "2", "--node-rank", str(i), "--master-addr", master or net[0].ip,
            "--master-port", str(port), "--iface", iface or net[i].iface, "--wait", str(wait), *extra]


def start(net, i, argv):
    return net.popen(i, argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(p, timeout=150) -> tuple[int, str]:
    out, _ = p.communicate(timeout=timeout)
    print(out)  # shown by pytest on failure
    return p.returncode, out


def test_right_interface_passes_and_bandwidth_under_tbf():
    with two_nodes(rate="100mbit") as net:
        p1 = start(net, 1, doctor_argv(net, 1, "--bandwidth-mb", "8"))
        p0 = start(net, 0, doctor_argv(net, 0, "--bandwidth-mb", "8"))
        (rc0, out0), (rc1, out1) = finish(p0), finish(p1)
    assert rc0 == 0 and rc1 == 0
    for out, i in ((out0, 0), (out1, 1)):
        assert "[FAIL]" not in out
        assert re.search(r"\[PASS\] interface: gf\S+ is up with 10\.77\.0\.%d" % (i + 1), out)
        assert "[PASS] peers: all 2 nodes joined" in out
        assert "[PASS] clock skew" in out
        m = re.search(r"bus bandwidth [\d.]+ MB/s = ([\d.]+) Gbit/s", out)
        assert m, out
        mbit = float(m.group(1)) * 1000
        assert 70 <= mbit <= 130, f"measured {mbit:.0f} Mbit/s under a 100 mbit tbf limit"
        assert re.search(r"accumulation >= \d+ keeps communication under 10%", out)
    assert "[PASS] master address: 10.77.0.1" in out0 and "[PASS] master port" in out0
    assert "[PASS] master reachable" in out1


@pytest.mark.parametrize("first", [1, 0])
def test_nodes_started_20s_apart(first):
    with two_nodes() as net:
        a = start(net, first, doctor_argv(net, first, "--bandwidth-mb", "1"))
        time.sleep(20)
        b = start(net, 1 - first, doctor_argv(net, 1 - first, "--bandwidth-mb", "1"))
        (rca, outa), (rcb, outb) = finish(a), finish(b)
    assert rca == 0 and rcb == 0
    assert "[PASS] peers: all 2 nodes joined" in outa and "[PASS] peers: all 2 nodes joined" in outb
    if first == 1:  # the worker waited for the master
        assert re.search(r"accepts connections \(after waiting (1\d|2\d) s\)", outa)


def test_missing_interface():
    with two_nodes() as net:
        rc, out = finish(start(net, 1, doctor_argv(net, 1, iface="eth9", wait=5)))
    assert rc != 0
    assert "[FAIL] interface: interface 'eth9' does not exist on this node; available:" in out
    assert net[1].iface in out and "fix: pass --iface" in out


def test_unreachable_master():
    with two_nodes() as net:
        rc, out = finish(start(net, 1, doctor_argv(net, 1, master="10.77.0.9", wait=6)))
    assert rc != 0
    assert re.search(r"\[FAIL\] master reachable: master 10\.77\.0\.9\S* unreachable", out)
    assert "closed" not in out.split("[FAIL] master reachable")[1].splitlines()[0]


def test_closed_port():
    with two_nodes() as net:
        # node 0 exists and answers, but nothing listens on the port
        rc, out = finish(start(net, 1, doctor_argv(net, 1, port=29555, wait=5)))
    assert rc != 0
    assert "[FAIL] master reachable: port 29555 closed on master 10.77.0.1 (connection refused)" in out
    assert "unreachable" not in out


def test_master_port_in_use_and_wrong_master_addr():
    with two_nodes() as net:
        holder = start(net, 0, [sys.executable, "-c", "import socket,time; s=socket.socket(); "
                                "s.bind(('10.77.0.1', 29500)); s.listen(); print('ok', flush=True); time.sleep(60)"])
        assert holder.stdout.readline().strip() == "ok"
        rc, out = finish(start(net, 0, doctor_argv(net, 0, wait=5)))
        rc2, out2 = finish(start(net, 0, doctor_argv(net, 0, master="10.77.0.2", port=29501, wait=5)))
    assert rc != 0 and "[FAIL] master port: port 29500 on 10.77.0.1 cannot be used" in out
    assert rc2 != 0 and "[FAIL] master address: --master-addr 10.77.0.2 is not an address of this node" in out2


# ---------------------------------------------------------------------------------------------------
# gptforge launch across the two nodes: a rank that dies ends the job on both nodes, naming the rank

WORKER = r'''
import os, sys, time, datetime, torch, torch.distributed as dist
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=float(os.environ.get("GPTFORGE_COLLECTIVE_TIMEOUT_S", "30"))))
r, x = dist.get_rank(), torch.ones(1000)
for i in range(1000):
    dist.all_reduce(x)
    if i == 10 and r == int(sys.argv[1]):
        raise RuntimeError(f"boom from rank {r}")
    time.sleep(0.02)
'''


def test_launch_two_nodes_rank_dies(tmp_path: Path):
    script = tmp_path / "die.py"
    script.write_text(WORKER)
    with two_nodes() as net:
        t0 = time.monotonic()
        ps = [start(net, i, [sys.executable, "-m", "gptforge", "launch", "--nnodes", "2", "--node-rank", str(i),
                             "--master-addr", net[0].ip, "--iface", net[i].iface, "--nproc-per-node", "2",
                             "--", str(script), "3"]) for i in (0, 1)]
        results = [finish(p, timeout=120) for p in ps]
        elapsed = time.monotonic() - t0
    assert all(rc != 0 for rc, _ in results)
    assert elapsed < 60
    out1 = results[1][1]
    assert "gptforge launch: rank 3 (local rank 1) on node 1" in out1 and "boom from rank 3" in out1
    assert "gptforge launch: rank" in results[0][1] and "on node 0" in results[0][1]
