"""torchrun worker: DDP with `parallel.grad_compression=powersgd` (gptforge.parallel.compress.register_compression)
on 2 gloo ranks, step by step against exact DDP.

A small model (Linear 48->40, tanh, Linear 40->32: two matrices PowerSGD compresses, two vectors it all-reduces
exactly) at fixed parameters sees a new rank-dependent batch every step. Each step, the rank's own gradient
(backward under no_sync) and then DDP's gradient through the PowerSGD hook (the mean over ranks as PowerSGD gives
it), and after it PowerSGD's error-feedback residual of this rank (its state's error_dict, mapped back to the
parameters through the bucket's layout). Cases: "exact" (rank 2, one fixed input per rank and new targets each
step: each gradient matrix's mean has rank <= 2 and the same row space every step, which the warm-started Q
spans) and "lossy" (rank 1, 8 new samples per rank and step). Each rank saves OUT/rank{r}.pt;
test_grad_compression compares in float64."""

from __future__ import annotations

import torch
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd
from torch.nn.parallel import DistributedDataParallel as DDP

from gptforge.config.schema import Config
from gptforge.parallel.compress import register_compression

from _cases_worker import run_cases

CASES = {"exact": (2, 1, True), "lossy": (1, 8, False)}  # PowerSGD rank, samples per rank, the same inputs each step
START, STEPS = 2, 6  # parallel.powersgd_start: the first 2 steps are exact all-reduces

LAYOUT: dict[int, list[tuple[int, int, int]]] = {}  # bucket index -> (parameter index, offset, numel)
_hook = psgd.powerSGD_hook


def recording_hook(state, bucket):
    """PyTorch's powerSGD_hook, after noting where each gradient lies in the bucket (its error has that layout)."""
    buf, index = bucket.buffer(), {id(p): i for i, p in enumerate(recording_hook.params)}
    LAYOUT[bucket.index()] = [(index[id(p)], (g.data_ptr() - buf.data_ptr()) // g.element_size(), g.numel())
                              for p, g in zip(bucket.parameters(), bucket.gradients())]
    return _hook(state, bucket)


def steps(env, rank: int, batch: int, fixed_inputs: bool) -> list[dict]:
    cfg = Config().parallel
    cfg.strategy, cfg.grad_compression, cfg.powersgd_rank, cfg.powersgd_start = "ddp", "powersgd", rank, START
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(48, 40), torch.nn.Tanh(), torch.nn.Linear(40, 32))
    params = list(model.parameters())
    recording_hook.params = params
    LAYOUT.clear()
    ddp = DDP(model)
    psgd.powerSGD_hook = recording_hook  # register_compression looks the hook up when it is called
    try:
        assert register_compression(ddp, cfg).startswith(f"PowerSGD rank {rank} with error feedback")
    finally:
        psgd.powerSGD_hook = _hook
    state = ddp._comm_hooks[0][1]
    assert isinstance(state, psgd.PowerSGDState) and state.use_error_feedback
    out = []
    for t in range(STEPS):
        gen = torch.Generator().manual_seed(1000 * rank + 10 * (0 if fixed_inputs else t) + env.rank)
        x = torch.randn(batch, 48, generator=gen)
        y = torch.randn(batch, 32, generator=gen.manual_seed(1000 * rank + 10 * t + env.rank + 5))
        with ddp.no_sync():
            (ddp(x) - y).pow(2).mean().backward()
        local = [p.grad.clone() for p in params]
        ddp.zero_grad(set_to_none=True)
        (ddp(x) - y).pow(2).mean().backward()
        compressed = [p.grad.clone() for p in params]
        ddp.zero_grad(set_to_none=True)
        error = [torch.zeros_like(p) for p in params]
        for bucket, flat in state.error_dict.items():
            for i, offset, n in LAYOUT[bucket]:
                error[i] = flat[offset:offset + n].view_as(params[i]).clone()
        out.append({"local": local, "compressed": compressed, "error": error, "has_error": bool(state.error_dict)})
    return out


if __name__ == "__main__":
    run_cases(CASES, steps)
