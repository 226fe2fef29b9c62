"""Tensor parallel x data parallel on a 2-D DeviceMesh: the small reference example.

A two-layer MLP is split over the "tp" mesh dimension (first Linear column-wise, second row-wise:
one all-reduce per forward), and the TP groups are replicated/sharded over the "dp" dimension with
FSDP2 (`fully_shard`), each data-parallel rank training on its own slice of every global batch.
With 2 nodes of 8 GPUs: TP=2 inside a node, DP=8 over the rest.

Run (any launcher that sets torchrun's environment):

    gptforge launch --nproc-per-node 4 -- examples/tp_dp_mlp.py --tp 2           # one node, DP=2
    gptforge launch --nnodes 2 --node-rank R --master-addr HOST0 --iface eth0 --nproc-per-node 8 \\
        -- examples/tp_dp_mlp.py --tp 2                                           # two nodes, DP=8
    torchrun --standalone --nproc-per-node 4 examples/tp_dp_mlp.py --tp 2
    python examples/tp_dp_mlp.py                                                  # one process: the reference

Each rank prints `[Rank r] DP rank: d, TP mesh: [ranks], DP mesh: [ranks]`; rank 0 prints the loss of every step
and, with --out FILE, writes the losses as JSON. The single-process run trains the same MLP (same
initial weights) on the same global batches, so its losses equal the distributed ones (fp32).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


class MLP(nn.Module):
    def __init__(self, dim: int = 32, hidden: int = 128):
        super().__init__()
        self.in_proj = nn.Linear(dim, hidden)
        self.out_proj = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.out_proj(F.relu(self.in_proj(x)))


def make_model(dim: int, hidden: int, seed: int) -> MLP:
    torch.manual_seed(seed)  # every rank (and the single process) starts from the same full weights
    return MLP(dim, hidden)


def global_batch(step: int, batch: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole step's batch, identical everywhere; a fixed random linear map plus a nonlinearity."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(batch, dim, generator=g)
    w = torch.randn(dim, dim, generator=torch.Generator().manual_seed(7)) / dim ** 0.5
    return x, torch.tanh(x @ w)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tp", type=int, default=2, help="tensor-parallel size (the rest of the world is DP)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=16, help="global batch (divisible by the DP size)")
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--hidden", type=int, default=128, help="hidden width (divisible by --tp)")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the per-step losses (JSON list) here, rank 0 / single process")
    return p.parse_args(argv)


def train_single(args) -> list[float]:
    model = make_model(args.dim, args.hidden, args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    losses = []
    for step in range(args.steps):
        x, y = global_batch(step, args.batch, args.dim)
        loss = F.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        print(f"step {step + 1}/{args.steps} loss {losses[-1]:.6f}", flush=True)
    return losses


def train_distributed(args) -> list[float]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    if world % args.tp:
        raise SystemExit(f"world size {world} is not divisible by --tp {args.tp}")
    dp = world // args.tp
    if args.batch % dp:
        raise SystemExit(f"--batch {args.batch} is not divisible by the DP size {dp}")
    if args.hidden % args.tp:
        raise SystemExit(f"--hidden {args.hidden} is not divisible by --tp {args.tp}")
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    # ranks r*tp .. r*tp+tp-1 form one TP group (on one node when tp <= GPUs per node)
    mesh = init_device_mesh(device.type, (dp, args.tp), mesh_dim_names=("dp", "tp"))
    tp_mesh, dp_mesh = mesh["tp"], mesh["dp"]
    dp_rank = dp_mesh.get_local_rank()
    # e.g. 4 ranks, tp=2: "[Rank 3] DP rank: 1, TP mesh: [2, 3], DP mesh: [1, 3]" (global ranks of each group)
    # one write per line, so the lines of the ranks do not interleave
    sys.stdout.write(f"[Rank {rank}] DP rank: {dp_rank}, TP mesh: {tp_mesh.mesh.tolist()}, "
                     f"DP mesh: {dp_mesh.mesh.tolist()}\n")
    sys.stdout.flush()

    model = make_model(args.dim, args.hidden, args.seed).to(device)
    parallelize_module(model, tp_mesh, {"in_proj": ColwiseParallel(), "out_proj": RowwiseParallel()})
    fully_shard(model, mesh=dp_mesh)  # FSDP2 over DP of the TP-sharded weights (2-D DTensors)
    # RowwiseParallel hands back a view of its output; we never modify it in place
    warnings.filterwarnings("ignore", message=r".*returned a view tensor")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)

    losses = []
    per_rank = args.batch // dp
    for step in range(args.steps):
        x, y = global_batch(step, args.batch, args.dim)  # same on all ranks; take this DP rank's slice
        x, y = x[dp_rank * per_rank:(dp_rank + 1) * per_rank].to(device), y[dp_rank * per_rank:(dp_rank + 1) * per_rank].to(device)
        loss = F.mse_loss(model(x), y)  # mean over the slice; FSDP averages gradients over DP
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        avg = loss.detach().clone()
        dist.all_reduce(avg)  # the TP ranks of a DP group hold the same loss: divide by the world
        losses.append(avg.item() / world)
        if rank == 0:
            print(f"step {step + 1}/{args.steps} loss {losses[-1]:.6f}", flush=True)
    # end cleanly (gloo can abort at interpreter exit otherwise: see gptforge/parallel/exit.py)
    dist.barrier()
    del model, opt
    dist.destroy_process_group()
    return losses if rank == 0 else []


def main(argv=None) -> int:
    args = parse_args(argv)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    losses = train_distributed(args) if distributed else train_single(args)
    if args.out and losses:
        with open(args.out, "w") as f:
            json.dump(losses, f)
    if distributed:  # skip interpreter finalization, where gloo's threads can abort the process
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
