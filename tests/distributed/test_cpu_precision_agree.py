"""train.precision=auto on CPUs: every rank trains in one precision, decided from the slowest node's timings
(gptforge.train.precision). Two real gloo processes, each given its own cached timings as if it were a node with
a CPU of its own; nothing is measured (the caches are seeded), so the test asserts decisions, not speed."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

from _harness import ROOT, job_env, kill_group

TWO_NODES = {"nnodes": 2, "local_rank": [0, 0]}
ONE_NODE = {"nnodes": 1, "local_rank": [0, 1]}
CASES = [
    # node A: bf16 2x faster; node B: bf16 2x slower -> its 4.0 s in bf16 is the job's step: fp32 on both
    (TWO_NODES | {"timings": [[2.0, 1.0], [2.0, 4.0]]},
     ["fp32", "auto: bf16 measured 0.50x fp32's speed (slower) on the slowest node for these shapes"]),
    # both faster in bf16: the slowest fp32 (3.0) against the slowest bf16 (1.5)
    (TWO_NODES | {"timings": [[2.0, 1.0], [3.0, 1.5]]},
     ["bf16", "auto: measured 2.00x faster than fp32 on the slowest node for these shapes"]),
    # a node without bf16: fp32 everywhere
    (TWO_NODES | {"timings": [[2.0, 1.0], None]}, ["fp32", "auto: a node's CPU has no native bf16"]),
    # one node: only local rank 0 reads (or measures); rank 1's own file says the opposite and is not read
    (ONE_NODE | {"timings": [[2.0, 1.0], [1.0, 2.0]]},
     ["bf16", "auto: measured 2.00x faster than fp32 on this CPU for these shapes"]),
]


def test_all_ranks_agree_on_the_slowest_nodes_choice(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cases = json.dumps([c for c, _ in CASES])
    procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "distributed" / "_precision_worker.py"),
                               str(tmp_path), cases],
                              env=job_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(r), WORLD_SIZE="2"),
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True) for r in (0, 1)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=120)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                kill_group(p)
    for p, out in zip(procs, outs):
        assert p.returncode == 0 and "terminate called" not in out, out[-3000:]
    for r, out in enumerate(outs):
        rows = [json.loads(ln) for ln in out.splitlines() if ln.startswith("[")]
        assert len(rows) == len(CASES), out[-3000:]
        for (case, (want, why)), (got, got_why, measured) in zip(CASES, rows):
            # the reason carries the cache's path where the timings came from one (the rank's own file)
            assert (got, got_why.split("; cached in ")[0], measured) == (want, why, 0), (r, case, got_why)
