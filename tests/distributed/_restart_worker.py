"""Worker for test_elastic_store: gptforge's process-group set-up under a plain `torchrun --max-restarts 1`
(torchrun's shared agent store). Attempt 0: rank 1 dies by SIGKILL after one all-reduce, rank 0 fails in
its next collective. Attempt 1: both set up again and all-reduce; prints "attempt 1 rank R sum S"."""

import os
import signal
import sys
import time

import torch
import torch.distributed as dist

from gptforge.config.schema import ParallelSection
from gptforge.parallel.exit import run_main
from gptforge.parallel.mesh import init_distributed, shutdown


def main() -> int:
    attempt = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
    env = init_distributed(ParallelSection(strategy="ddp", timeout_s=30), "cpu")
    x = torch.ones(1)
    dist.all_reduce(x)
    print(f"attempt {attempt} rank {env.rank} sum {x.item():g}", flush=True)
    if attempt == 0:
        if env.rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        try:
            for _ in range(600):
                dist.all_reduce(x)
                time.sleep(0.05)
        finally:
            os._exit(1)
    shutdown(env)
    return 0


# ends as `python -m gptforge` does (run_main: no interpreter finalization after a gloo group, see
# gptforge.parallel.exit): a plain sys.exit here aborted now and then with "terminate called without an
# active exception" (SIGABRT) after both ranks had finished attempt 1
sys.exit(run_main(main))
