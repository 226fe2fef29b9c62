"""Worker for test_elastic_store: rank 0 gets SIGTERM and asks the other rank to agree on stopping
(the trainer's per-step all-reduce under StopSignals.bounded, train.grace_s=60). argv[1]: "dead" (rank 1 exits first: the all-reduce fails)
or "silent" (rank 1 lives but never answers)."""

import datetime
import os
import signal
import sys
import time

import torch
import torch.distributed as dist

from gptforge.parallel.mesh import DistEnv
from gptforge.train.preempt import StopSignals
from gptforge.train.stepsync import StepSync

rank = int(os.environ["RANK"])
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
dist.barrier()
if rank == 1:
    if sys.argv[1] == "dead":
        os._exit(9)
    time.sleep(60)
    os._exit(0)
time.sleep(0.5)
env = DistEnv(rank=0, world_size=2)
with StopSignals(60, env) as stop:
    os.kill(os.getpid(), signal.SIGTERM)
    with stop.bounded():  # as Trainer.train_step runs the step's one all-reduce
        StepSync(env).reduce(torch.zeros(()), {}, stop.signum, save_pending=False)
print("the step's all-reduce returned", flush=True)
os._exit(0)
