"""parallelize(model, env, cfg): applied from outside the model, in torchtitan's order:
tensor parallel -> activation checkpointing -> torch.compile -> FSDP2 or DDP."""

from __future__ import annotations

import torch
import torch.nn as nn

from gptforge.errors import UserError
from gptforge.parallel.compress import check_compression, register_compression
from gptforge.parallel.tp import apply_tp


def resolve_strategy(env, parallel_cfg) -> str:
    """none | ddp | fsdp for this world: auto shards when dp_shard > 1, else replicates."""
    if env.dp_size == 1:
        explicit = env.mesh is not None and env.tp_size == 1 and parallel_cfg.strategy in ("ddp", "fsdp")
        return parallel_cfg.strategy if explicit else "none"
    if parallel_cfg.strategy == "none":
        raise UserError("parallel.strategy=none but there are several data-parallel ranks; use ddp or fsdp")
    if parallel_cfg.strategy == "auto":
        # DDP cannot reduce DTensor gradients: with TP, pure replication runs as HSDP with dp_shard=1
        return "fsdp" if env.mesh["dp_shard"].size() > 1 or env.tp_size > 1 else "ddp"
    if parallel_cfg.strategy == "ddp" and env.tp_size > 1:
        raise UserError(f"parallel.strategy=ddp cannot be combined with tensor parallel (parallel.tp={env.tp_size}): "
                        "DDP does not reduce DTensor gradients; use parallel.strategy=fsdp or auto "
                        "(with parallel.dp_shard=1 and parallel.dp_replicate=N it replicates like DDP)")
    return parallel_cfg.strategy


def apply_activation_checkpointing(model: nn.Module) -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for name, block in list(model.layers.named_children()):
        model.layers.register_module(name, checkpoint_wrapper(block, preserve_rng_state=False))


def parallelize(model: nn.Module, env, cfg) -> nn.Module:
    """Returns the module to train (may be a DDP wrapper). cfg is the whole Config."""
    strategy = resolve_strategy(env, cfg.parallel)
    check_compression(cfg.parallel, strategy, env.dp_size, env.tp_size)
    if env.tp_size > 1:
        apply_tp(model, env.mesh["tp"], sequence_parallel=cfg.parallel.sequence_parallel)
    if cfg.train.activation_checkpointing:
        apply_activation_checkpointing(model)
    if cfg.train.compile:
        for name, block in list(model.layers.named_children()):
            model.layers.register_module(name, torch.compile(block))
    if env.is_main and env.mesh is not None:
        shape = " x ".join(f"{n} {env.mesh[n].size()}" for n in env.mesh.mesh_dim_names)
        print(f"parallel: {strategy}{' + tp' if env.tp_size > 1 else ''} on {env.world_size} rank(s), "
              f"mesh {shape}, backend {'nccl' if env.device.type == 'cuda' else 'gloo'}", flush=True)
    if strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        rep = env.mesh["dp_replicate"].size()
        dp_mesh = env.mesh["dp_replicate", "dp_shard"] if rep > 1 else env.mesh["dp_shard"]
        mp = None
        if cfg.parallel.mixed_precision and cfg.train.precision == "bf16" and env.device.type == "cuda":
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        kw = {"mesh": dp_mesh} | ({"mp_policy": mp} if mp else {})
        for block in model.layers.values():
            fully_shard(block, **kw)
        fully_shard(model, **kw)
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [env.device.index] if env.device.type == "cuda" else None
        ddp = DDP(model, device_ids=ids)
        what = register_compression(ddp, cfg.parallel)
        if what and env.is_main:
            print(f"parallel: ddp gradients sent as {what}", flush=True)
        return ddp
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The plain GPT inside a DDP wrapper (FSDP2 and TP modify in place)."""
    return model.module if hasattr(model, "module") and not hasattr(model, "cfg") else model
