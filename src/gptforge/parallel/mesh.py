"""Process-group and DeviceMesh set-up from the environment torchrun provides."""

from __future__ import annotations

import datetime
import gc
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from gptforge.errors import UserError
from gptforge.parallel.exit import mark_distributed


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    mesh: object = None  # DeviceMesh with dims ("dp_replicate", "dp_shard", "tp") or None
    dp_rank: int = 0
    dp_size: int = 1
    tp_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():  # CUDA and ROCm builds both answer here
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"train.device={name} but no GPU is visible to torch; use --train.device=cpu or auto")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank % torch.cuda.device_count())
    return dev


def mesh_shape(world_size: int, dp_replicate: int, dp_shard: int, tp: int) -> tuple[int, int, int]:
    """Fill a single -1 with the rest of the world size; the product must equal the world size."""
    dims = [dp_replicate, dp_shard, tp]
    if dims.count(-1) > 1:
        raise UserError("only one of parallel.dp_replicate / dp_shard / tp may be -1")
    known = 1
    for d in dims:
        if d != -1:
            if d < 1:
                raise UserError(f"parallel sizes must be >= 1 or -1, got {dims}")
            known *= d
    if -1 in dims:
        if world_size % known:
            raise UserError(f"world size {world_size} is not divisible by the fixed parallel sizes "
                            f"(dp_replicate*dp_shard*tp without the -1) = {known}; start a multiple of {known} "
                            "processes (torchrun --nproc-per-node / gptforge launch) or lower parallel.tp")
        dims[dims.index(-1)] = world_size // known
    prod = dims[0] * dims[1] * dims[2]
    if prod != world_size:
        raise UserError(f"parallel.dp_replicate*dp_shard*tp = {dims[0]}*{dims[1]}*{dims[2]} = {prod} "
                        f"but the world size is {world_size}; make the product equal {world_size}")
    return dims[0], dims[1], dims[2]


def init_distributed(parallel_cfg, device_name: str = "auto") -> DistEnv:
    """Single process unless torchrun set WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_name, local_rank)
    # one process: no process group, unless torchrun started it and the config names a strategy (a
    # one-GPU DDP/FSDP2 smoke test of the NCCL/RCCL path before a bigger run)
    launched = "TORCHELASTIC_RUN_ID" in os.environ and parallel_cfg.strategy in ("ddp", "fsdp")
    if world == 1 and not launched:
        mesh_shape(1, parallel_cfg.dp_replicate, parallel_cfg.dp_shard, parallel_cfg.tp)
        return DistEnv(device=device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    mark_distributed()
    if not dist.is_initialized():
        timeout = int(os.environ.get("GPTFORGE_COLLECTIVE_TIMEOUT_S", parallel_cfg.timeout_s))
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout),
                                device_id=device if device.type == "cuda" else None)
    rep, shard, tp = mesh_shape(world, parallel_cfg.dp_replicate, parallel_cfg.dp_shard, parallel_cfg.tp)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (rep, shard, tp), mesh_dim_names=("dp_replicate", "dp_shard", "tp"))
    dp_mesh = mesh["dp_replicate", "dp_shard"]._flatten("dp")
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=device, mesh=mesh,
                   dp_rank=dp_mesh.get_local_rank(), dp_size=rep * shard, tp_size=tp)


def all_reduce_mean(x: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Mean over the data-parallel ranks (tp ranks hold the same value)."""
    if not env.distributed:
        return x
    x = x.detach().clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x / env.world_size


def barrier(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.barrier()


def shutdown(env: DistEnv) -> None:
    """End cleanly: barrier (no peer still waits on us), gc, destroy the process groups.

    The caller drops its model/optimizer first; `python -m gptforge` then leaves with os._exit
    (gptforge.parallel.exit explains gloo's abort at interpreter exit and why this avoids it)."""
    if dist.is_initialized():
        if sys.exc_info()[0] is not None:
            # called from a `finally` while an error propagates: the other ranks may be inside another
            # collective, a barrier would only wait for the timeout. torchrun stops the job.
            return
        try:
            dist.barrier()
        finally:
            env.mesh = None
            gc.collect()
            dist.destroy_process_group()
