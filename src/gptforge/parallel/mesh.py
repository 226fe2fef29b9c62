"""Process-group and DeviceMesh set-up from the environment torchrun provides."""

from __future__ import annotations

import datetime
import gc
import json
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from gptforge.errors import UserError
from gptforge.hardware import check_device_name
from gptforge.parallel import hang
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
    nnodes: int = 1
    ranks_per_node: int = 1
    layout: object = None  # gptforge.parallel.layout.Layout once settled

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    check_device_name(name, "the device")
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


def node_counts(world: int, environ=os.environ) -> tuple[int, int]:
    """(nodes, ranks per node) from torchrun's LOCAL_WORLD_SIZE; one node when it is missing or uneven."""
    local = int(environ.get("LOCAL_WORLD_SIZE", world) or world)
    if local < 1 or world % local:
        return 1, world
    return world // local, local


def layout_pending(parallel_cfg, nnodes: int) -> bool:
    """True when the mesh shape depends on the model (gptforge.parallel.layout): strategy auto with
    dp_replicate / dp_shard left at their defaults (1 / -1) on several nodes."""
    return (nnodes > 1 and parallel_cfg.strategy == "auto" and parallel_cfg.dp_replicate == 1
            and parallel_cfg.dp_shard == -1)


def build_mesh(env: DistEnv, rep: int, shard: int, tp: int) -> None:
    """The DeviceMesh ("dp_replicate", "dp_shard", "tp") over every rank; ranks are row-major, so a node's
    ranks (contiguous under torchrun) share a dp_replicate index when shard * tp = ranks per node."""
    from torch.distributed.device_mesh import init_device_mesh

    env.mesh = init_device_mesh(env.device.type, (rep, shard, tp), mesh_dim_names=("dp_replicate", "dp_shard", "tp"))
    dp_mesh = env.mesh["dp_replicate", "dp_shard"]._flatten("dp")
    env.dp_rank, env.dp_size, env.tp_size = dp_mesh.get_local_rank(), rep * shard, tp


def init_distributed(parallel_cfg, device_name: str = "auto") -> DistEnv:
    """Single process unless torchrun set WORLD_SIZE > 1. The mesh is built here unless its shape depends on
    the model (layout_pending: several nodes, defaults): gptforge.parallel.layout.settle_layout builds it
    then. dp_rank / dp_size do not depend on how the data-parallel ranks split into replicate x shard."""
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
    rep, shard, tp = mesh_shape(world, parallel_cfg.dp_replicate, parallel_cfg.dp_shard, parallel_cfg.tp)
    nnodes, per_node = node_counts(world)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    mark_distributed()
    if not dist.is_initialized():
        timeout = int(os.environ.get("GPTFORGE_COLLECTIVE_TIMEOUT_S", parallel_cfg.timeout_s))
        backend = "nccl" if device.type == "cuda" else "gloo"
        store = restart_store(world, rank, datetime.timedelta(seconds=timeout))
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout), store=store,
                                rank=rank if store else -1, world_size=world if store else -1,
                                device_id=device if device.type == "cuda" else None)
    record_peers(world, local_rank)
    hang.install(rank, world, int(os.environ.get("GPTFORGE_COLLECTIVE_TIMEOUT_S", parallel_cfg.timeout_s)))
    env = DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=device, dp_rank=rank // tp,
                  dp_size=world // tp, tp_size=tp, nnodes=nnodes, ranks_per_node=per_node)
    if not layout_pending(parallel_cfg, nnodes):
        build_mesh(env, rep, shard, tp)
    return env


def restart_store(world: int, rank: int, timeout: datetime.timedelta):
    """The process group's store after torchrun restarted the workers of a single node, else None (the
    usual env:// set-up). torchrun's agent keeps one TCP store for every attempt
    (TORCHELASTIC_USE_AGENT_STORE=True) and torch does not separate the attempts' keys: restarted gloo/NCCL
    ranks can read a dead peer's address from the previous attempt ("connectFullMesh ... Connection
    refused"; pytorch/pytorch#135712). A prefix per attempt separates them; TORCHELASTIC_RESTART_COUNT
    is the same for every worker only when one agent started them all (one node). `gptforge launch
    --max-restarts` avoids the shared store altogether (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1)."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if (os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or attempt == "0"
            or os.environ.get("LOCAL_WORLD_SIZE") != str(world)):
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                          timeout=timeout)
    return dist.PrefixStore(f"gptforge/attempt_{attempt}/", store)


def record_peers(world: int, local_rank: int) -> None:
    """For `gptforge launch`, which names the node it lost when a run fails (launch.failures.unreachable_peers):
    when it set GPTFORGE_PEERS_FILE (on every node), the ranks exchange their node rank and address
    (GPTFORGE_NODE_RANK, GPTFORGE_LOCAL_ADDR) once, and local rank 0 writes {node: address} there."""
    path = os.environ.get("GPTFORGE_PEERS_FILE")
    if not path or world < 2:
        return
    mine = (os.environ.get("GPTFORGE_NODE_RANK", ""), os.environ.get("GPTFORGE_LOCAL_ADDR", ""))
    every: list = [None] * world
    dist.all_gather_object(every, mine)
    if local_rank == 0:
        with open(path, "w") as f:
            json.dump({node: addr for node, addr in every if node and addr}, f)


def is_dtensor(t) -> bool:
    """A DTensor (FSDP2 / TP parameter or gradient)? Asked without importing torch.distributed.tensor, whose
    import (DTensor pulls in sympy) adds ~45 MiB to every process: no DTensor exists until something imported it."""
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, mod.DTensor)


def all_reduce_mean(x: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Mean over the data-parallel ranks (tp ranks hold the same value)."""
    if not env.distributed:
        return x
    x = x.detach().clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x / env.world_size


def broadcast_object(obj, env):
    """Rank 0's object on every rank."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(fn, env):
    """Run fn() on rank 0 only; every rank gets its result, or the same UserError (no rank is left waiting)."""
    out = None
    if env.is_main:
        try:
            out = ("ok", fn())
        except UserError as e:
            out = ("error", str(e))
    kind, value = broadcast_object(out, env)
    if kind == "error":
        raise UserError(value)
    return value


def all_true(flag: bool, env) -> bool:
    if not env.distributed:
        return flag
    t = torch.tensor([1 if flag else 0], device=env.device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


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
