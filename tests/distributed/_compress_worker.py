"""torchrun worker: the collectives of DDP with gradient compression, in the order they run.

For each of bf16 and powersgd: 3 optimizer steps of 2 accumulation micro-steps on a model of 4 layers of
d_model 256 (~13 MB of fp32 gradients: several DDP buckets). A dispatch mode records every c10d op with
the dtype of its first tensor and its number of elements (collectives issued from Gloo's callback
threads, e.g. PowerSGD's Q, are not seen), and a gradient hook on the position embedding (the last gradient
backward computes) records "pos_emb" where it fires. Prints one JSON line from rank 0:
{kind: [[ops of step 0 micro 0], [step 0 micro 1], ...]}."""

from __future__ import annotations

import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gptforge.config.schema import Config
from gptforge.model.gpt import GPTConfig, build_model
from gptforge.parallel.exit import run_main
from gptforge.parallel.parallelize import parallelize
from gptforge.train.trainer import grad_sync

from _comm_worker import report  # this script's folder is on sys.path


class CollectiveLog(TorchDispatchMode):
    def __init__(self, ops: list[str]):
        super().__init__()
        self.ops = ops

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace in ("c10d", "_c10d_functional", "c10d_functional"):
            first = args[0][0] if args and isinstance(args[0], (list, tuple)) and args[0] else None
            dtype = str(first.dtype).replace("torch.", "") if isinstance(first, torch.Tensor) else "?"
            numel = sum(t.numel() for t in args[0]) if args and isinstance(args[0], (list, tuple)) else 0
            self.ops.append(f"{func.__name__}:{dtype}:{numel}")
        return func(*args, **(kwargs or {}))


def steps_of(kind: str, env) -> list[list[str]]:
    cfg = Config()
    cfg.parallel.strategy = "ddp"
    cfg.parallel.grad_compression = kind
    cfg.parallel.powersgd_start = 2
    model = build_model(GPTConfig(vocab_size=64, block_size=16, n_layer=4, n_head=4, d_model=256, d_ff=1024), seed=0)
    model = parallelize(model, env, cfg)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    ops: list[str] = []
    model.module.pos_emb.weight.register_hook(lambda g: ops.append("pos_emb"))
    gen = torch.Generator().manual_seed(env.rank)
    out = []
    for _step in range(3):
        for micro in range(2):
            ops.clear()
            x = torch.randint(0, 64, (2, 16), generator=gen)
            with CollectiveLog(ops):
                with grad_sync(model, micro == 1):
                    model(x).float().pow(2).mean().backward()
            out.append(list(ops))
        opt.step()
        opt.zero_grad()
    return out


def main() -> int:
    return report(steps_of, ("bf16", "powersgd"))


if __name__ == "__main__":
    sys.exit(run_main(main))
