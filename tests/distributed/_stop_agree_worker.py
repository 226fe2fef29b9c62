"""Worker for test_elastic_store: rank 0 gets SIGTERM and asks the other rank to agree on stopping
(StopSignals.should_stop, train.grace_s=60). argv[1]: "dead" (rank 1 exits first: the all-reduce fails)
or "silent" (rank 1 lives but never answers)."""

import datetime
import os
import signal
import sys
import time

import torch.distributed as dist

from gptforge.parallel.mesh import DistEnv
from gptforge.train.preempt import StopSignals

rank = int(os.environ["RANK"])
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
dist.barrier()
if rank == 1:
    if sys.argv[1] == "dead":
        os._exit(9)
    time.sleep(60)
    os._exit(0)
time.sleep(0.5)
with StopSignals(60, DistEnv(rank=0, world_size=2)) as stop:
    os.kill(os.getpid(), signal.SIGTERM)
    stop.should_stop()
print("should_stop returned", flush=True)
os._exit(0)
