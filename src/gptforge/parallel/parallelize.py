"""parallelize(model, env, cfg): applied from outside the model, in torchtitan's order:
tensor parallel -> activation checkpointing -> torch.compile -> FSDP2 or DDP."""

from __future__ import annotations

import torch
import torch.nn as nn

from gptforge.parallel.compress import check_compression, register_compression
from gptforge.parallel.layout import resolve_strategy, settle_layout
from gptforge.parallel.localsgd import check_local_sgd


def apply_activation_checkpointing(model: nn.Module) -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for name, block in list(model.layers.named_children()):
        model.layers.register_module(name, checkpoint_wrapper(block, preserve_rng_state=False))


def parallelize(model: nn.Module, env, cfg) -> nn.Module:
    """Returns the module to train (may be a DDP wrapper). cfg is the whole Config. Settles the layout first
    (gptforge.parallel.layout: builds the mesh when its shape depends on the model, prints the layout line)."""
    settle_layout(env, cfg, model.cfg)
    strategy = resolve_strategy(env, cfg.parallel)
    check_compression(cfg.parallel, strategy, env.dp_size, env.tp_size)
    check_local_sgd(cfg.parallel, strategy, env.tp_size)
    if env.tp_size > 1:
        from gptforge.parallel.tp import apply_tp  # DTensor's import costs ~45 MiB: only when used
        apply_tp(model, env.mesh["tp"], sequence_parallel=cfg.parallel.sequence_parallel)
    if cfg.train.activation_checkpointing:
        apply_activation_checkpointing(model)
    if cfg.train.compile:
        for name, block in list(model.layers.named_children()):
            model.layers.register_module(name, torch.compile(block))
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
    if strategy == "ddp" and cfg.parallel.sync_every > 1:
        if env.is_main:
            print(f"parallel: local SGD: {env.dp_size} replicas train on their own and average their parameter "
                  f"change every {cfg.parallel.sync_every} steps (outer lr {cfg.parallel.outer_lr}, momentum "
                  f"{cfg.parallel.outer_momentum})", flush=True)
        return model  # the Trainer's LocalSGD synchronises the replicas
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
