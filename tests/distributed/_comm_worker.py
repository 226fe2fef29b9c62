"""torchrun worker: counts the gradient collectives of 4 accumulation micro-steps under DDP and FSDP2.

Prints one JSON line from rank 0: {strategy: [[collective ops of micro-step 0], ..., [micro-step 3]]}.
Collectives are seen by a dispatch mode that records every c10d op (each process-group call dispatches
one) and, for DDP, also by a comm hook on its gradient buckets."""

from __future__ import annotations

import json
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gptforge.config.schema import Config
from gptforge.model.gpt import GPTConfig, build_model
from gptforge.parallel.exit import run_main
from gptforge.parallel.mesh import init_distributed, shutdown
from gptforge.parallel.parallelize import parallelize
from gptforge.train.trainer import grad_sync

class CollectiveLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace in ("c10d", "_c10d_functional", "c10d_functional"):
            self.ops.append(func.__name__)
        return func(*args, **(kwargs or {}))


def micro_steps(strategy: str, env) -> list[list[str]]:
    cfg = Config()
    cfg.parallel.strategy = strategy
    model = build_model(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, d_model=32, d_ff=64), seed=0)
    model = parallelize(model, env, cfg)
    hook_calls = []
    if strategy == "ddp":
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def counting_hook(state, bucket):
            hook_calls.append(1)
            return allreduce_hook(state, bucket)

        model.register_comm_hook(None, counting_hook)
    steps = []
    gen = torch.Generator().manual_seed(env.rank)
    for micro in range(4):
        x = torch.randint(0, 64, (2, 16), generator=gen)
        before = len(hook_calls)
        with CollectiveLog() as log:
            with grad_sync(model, micro == 3):
                model(x).float().pow(2).mean().backward()
        ops = list(log.ops)
        ops += ["ddp_comm_hook"] * (len(hook_calls) - before)
        steps.append(ops)
    return steps


def report(steps_of, kinds: tuple[str, ...]) -> int:
    """Run steps_of(kind, env) for each kind; rank 0 prints "COMMS {kind: ...}" (also for _compress_worker)."""
    env = init_distributed(Config().parallel, "cpu")
    out = {}
    for k in kinds:
        env.layout = None  # one process, several models: each settles its own layout (a run settles once)
        out[k] = steps_of(k, env)
    if env.rank == 0:
        print("COMMS " + json.dumps(out), flush=True)
    shutdown(env)
    return 0


def main() -> int:
    return report(micro_steps, ("ddp", "fsdp"))


if __name__ == "__main__":
    sys.exit(run_main(main))
