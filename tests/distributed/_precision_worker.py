"""Worker for test_cpu_precision_agree: each rank is given its own cache file of timings (as if it were a node with
its own CPU) and runs train.precision's auto decision; it prints one JSON line per case: [precision, why,
measurements]. argv[1]: a folder; argv[2]: the cases as JSON, a list of {"nnodes", "local_rank": [r0, r1],
"timings": [[fp32_s, bf16_s] or null (no bf16 on that rank's CPU), ...]}."""

import datetime
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from gptforge.model.gpt import GPTConfig
from gptforge.parallel.mesh import DistEnv
from gptforge.train import precision as prec
from gptforge.parallel.exit import hard_exit

rank = int(os.environ["RANK"])
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
mcfg = GPTConfig(n_layer=2, n_head=2, d_model=32, d_ff=64, block_size=16, vocab_size=64).complete()
for i, case in enumerate(json.loads(sys.argv[2])):
    path = Path(sys.argv[1]) / f"case{i}-rank{rank}.json"
    timings = case["timings"][rank]
    if timings is not None:
        entry = {"fp32_s": timings[0], "bf16_s": timings[1], "tokens": 64, "when": "2026-01-01"}
        path.write_text(json.dumps({"format": 1, "entries": {prec.cache_key(mcfg, 4): entry}}))
    env = DistEnv(rank=rank, world_size=2, local_rank=case["local_rank"][rank], nnodes=case["nnodes"],
                  device=torch.device("cpu"))
    before = prec.measurements
    got = prec.train_precision("auto", env, mcfg, 4, cache_path=path, bf16_supported=timings is not None)
    print(json.dumps([*got, prec.measurements - before]), flush=True)
dist.barrier()
dist.destroy_process_group()
hard_exit(0)  # no interpreter finalization after a gloo group (gptforge.parallel.exit)
