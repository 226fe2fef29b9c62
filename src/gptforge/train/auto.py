"""`--train.auto`: fit a model to a device. Keeps the configured effective batch and picks micro-batch,
accumulation, precision and activation checkpointing from gptforge.model.cost's memory estimate."""

from __future__ import annotations

import dataclasses
import math
import os

from gptforge.config.schema import Config
from gptforge.errors import UserError
from gptforge.hardware import FIT_FRACTION, GiB, DeviceInfo, detect, resolve_precision
from gptforge.model import cost
from gptforge.model.gpt import GPTConfig
from gptforge.parallel.layout import choose_layout
from gptforge.parallel.mesh import layout_pending, node_counts


@dataclasses.dataclass
class AutoConfig:
    micro_batch: int
    grad_accum: int
    precision: str
    activation_checkpointing: bool
    reason: str
    estimated_bytes: int = 0
    fits: bool = True


def _divisors_desc(n: int) -> list[int]:
    return sorted({d for i in range(1, int(math.isqrt(n)) + 1) if n % i == 0 for d in (i, n // i)}, reverse=True)


def auto_config(model: GPTConfig, device_info: DeviceInfo, target_global_batch_seqs: int, world_size: int = 1,
                seq_len: int | None = None, shard: int = 1, fit_fraction: float = FIT_FRACTION,
                precision: str | None = None) -> AutoConfig:
    """Largest micro-batch (a divisor of the per-rank batch, so the effective batch is kept exactly)
    whose estimate fits ``fit_fraction`` of the device memory; activation checkpointing only when
    even micro_batch=1 does not fit without it. ``fits`` is False (with the reason) when nothing fits."""
    seq_len = seq_len or model.block_size
    world_size = max(1, int(world_size))
    if target_global_batch_seqs % world_size:
        per_rank = -(-target_global_batch_seqs // world_size)
        note = (f" (global batch {target_global_batch_seqs} is not a multiple of {world_size} ranks: "
                f"rounded up to {per_rank * world_size})")
    else:
        per_rank, note = max(1, target_global_batch_seqs // world_size), ""
    prec = precision or resolve_precision("auto", device_info.vendor, device_info.bf16)
    dev = device_info.vendor if device_info.is_gpu else "cpu"
    budget = int(device_info.memory * fit_fraction)

    def est(mb: int, ckpt: bool) -> int:
        return cost.estimate_memory(model, mb, seq_len, prec, activation_checkpointing=ckpt, world_size=world_size,
                                    shard=shard, device=dev)

    for ckpt in (False, True):
        for mb in _divisors_desc(per_rank):
            need = est(mb, ckpt)
            if need <= budget:
                why = (f"micro-batch {mb} x accumulation {per_rank // mb} x {world_size} rank(s) = "
                       f"{mb * (per_rank // mb) * world_size} sequences of {seq_len} tokens; "
                       f"estimated {need / GiB:.1f} GiB of {device_info.memory / GiB:.0f} GiB "
                       f"({fit_fraction:.0%} budget {budget / GiB:.1f} GiB), {prec}")
                if ckpt:
                    why += ", activation checkpointing (micro-batch 1 does not fit without it)"
                return AutoConfig(mb, per_rank // mb, prec, ckpt, why + note, need)
    need = est(1, True)
    return AutoConfig(1, per_rank, prec, True,
                      f"does not fit: even micro-batch 1 with activation checkpointing needs {need / GiB:.1f} GiB "
                      f"> {budget / GiB:.1f} GiB; shard the model with FSDP over more GPUs "
                      f"(--parallel.strategy=fsdp), use a smaller preset or a shorter context", need, fits=False)


def apply_auto(cfg: Config, model: GPTConfig, device_info: DeviceInfo | None = None, world_size: int | None = None,
               log=None) -> AutoConfig:
    """Keep the configured effective batch (micro_batch x grad_accum x data-parallel ranks) and set
    micro-batch, accumulation, precision (when train.precision=auto) and activation checkpointing for this
    device in cfg.train. `model` is the complete GPTConfig. Raises UserError when the model does not fit."""
    t, par = cfg.train, cfg.parallel
    world = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    dp = max(1, world // max(1, par.tp))
    dev = device_info or detect()
    nnodes, per_node = node_counts(world)
    if layout_pending(par, nnodes):  # across nodes auto replicates when the model fits (gptforge.parallel.layout)
        shard = choose_layout(cfg, model, world, nnodes, per_node, dev).dp_shard
    else:
        shard = max(1, dp // max(1, par.dp_replicate)) if par.strategy in ("auto", "fsdp") and dp > 1 else 1
    prec = None if t.precision == "auto" else t.precision
    ac = auto_config(model, dev, t.micro_batch * t.grad_accum * dp, dp, model.block_size, shard=shard, precision=prec)
    if not ac.fits:
        raise UserError(f"train.auto: {ac.reason}")
    t.micro_batch, t.grad_accum, t.activation_checkpointing = ac.micro_batch, ac.grad_accum, ac.activation_checkpointing
    if t.precision == "auto" and dev.is_gpu:  # a CPU's auto is measured for the model later (train.precision)
        t.precision = ac.precision
    if int(os.environ.get("RANK", "0")) == 0:
        (log or (lambda m: print(m, flush=True)))(f"auto-config for {dev.describe()}: {ac.reason}")
    return ac
