"""Advice for a model preset on this cluster: does it fit (auto-config), and which gradient accumulation,
compression or sync_every keeps communication under 10% of a step (the arithmetic: doctor.comm).

Step-time estimate: compute per micro-batch = FLOPs per token (6 x matmul parameters + 12 x layers x
d_model x context, PaLM appendix B) x tokens / (matmul TFLOPS measured here x 0.5 model efficiency);
communication per optimizer step = a ring all-reduce of the fp32 gradients, 2 (W-1)/W x 4 P bytes /
measured bus bandwidth + latency (W = nnodes x GPUs per node). Accumulation k keeps communication under
10% when comm <= 0.1 x (k x compute + comm), i.e. k >= 9 x comm / compute.

The parameter count and FLOPs come from gptforge.model.cost, the fit from gptforge.train.auto: the same
numbers as the MFU in the training log and `--train.auto`.
"""

from __future__ import annotations

import torch

from gptforge import hardware
from gptforge.config.presets import preset_model
from gptforge.errors import UserError
from gptforge.launch.doctor.bench import matmul_tflops
from gptforge.launch.doctor.comm import LIMIT, fraction, min_accum, paste_options, setting_comm
from gptforge.launch.doctor.options import DoctorOptions
from gptforge.launch.doctor.report import INFO, PASS, WARN, Report
from gptforge.model import cost
from gptforge.model.gpt import GPT
from gptforge.train.auto import auto_config


def memory(rep: Report, opts: DoctorOptions, dev: hardware.DeviceInfo):
    """The auto-config of ``--preset`` on this device and world: (model, auto-config, world, seq), or None."""
    try:
        model = preset_model(opts.preset, nominal_vocab=True).complete()
    except UserError as e:
        rep(WARN, "advice", str(e), "pass --preset with one of those names")
        return None
    world = opts.nnodes * (opts.nproc_per_node or max(1, dev.count if dev.is_gpu else 1))
    seq = opts.seq_len or model.block_size
    auto = auto_config(model, dev, opts.global_batch, world, seq)
    rep(INFO if auto.fits else WARN, "memory", f"preset {opts.preset}: {auto.reason}",
        "" if auto.fits else "use FSDP or a smaller preset")
    return model, auto, world, seq


def accumulation(rep: Report, opts: DoctorOptions, dev: hardware.DeviceInfo, lat: float, busbw: float) -> None:
    """The gradient accumulation that keeps communication under 10% of an optimizer step."""
    found = memory(rep, opts, dev)
    if found is None:
        return
    model, auto, world, seq = found
    P = cost.count_params(model)
    with torch.device("meta"):
        shapes = [tuple(p.shape) for p in GPT(model).parameters()]
    comms = setting_comm(shapes, world, busbw, lat)
    comm = comms["none"]
    tflops = matmul_tflops(dev.is_gpu, hardware.resolve_precision("auto", dev.vendor, dev.bf16)) * 0.5
    compute = cost.flops_per_token(model, seq) * auto.micro_batch * seq / (tflops * 1e12)
    k = min_accum(comm, compute)
    frac = fraction(comm, compute, auto.grad_accum)
    detail = (f"preset {opts.preset} ({P / 1e6:.0f}M params, {world} ranks): gradient all-reduce ~{comm:.2f} s per "
              f"optimizer step; compute ~{compute:.2f} s per micro-batch of {auto.micro_batch}x{seq} tokens "
              f"(~{tflops:.1f} TFLOPS effective); accumulation >= {k} keeps communication under 10%")
    if auto.grad_accum >= k:
        rep(PASS, "accumulation", detail + f" (auto-config uses {auto.grad_accum}: {frac:.0%})")
    else:
        rep(WARN, "accumulation", detail + f"; with {auto.grad_accum} communication is {frac:.0%} of a step",
            f"--train.grad_accum={k} --train.micro_batch={auto.micro_batch} (effective batch "
            f"{k * auto.micro_batch * world} sequences), or a faster network")
    compression(rep, comms, compute, auto.grad_accum, auto.micro_batch)


def compression(rep: Report, comms: dict, compute: float, accum: int, micro_batch: int) -> None:
    """Every setting that keeps communication under 10%, as options to paste."""
    shares = ", ".join(f"{c} {fraction(t, compute, accum):.0%}" for c, t in comms.items())
    detail = f"communication share of a step with accumulation {accum}: {shares}"
    if fraction(comms["none"], compute, accum) <= LIMIT:
        rep(PASS, "communication", detail + "; exact DDP already stays under 10%")
        return
    options = paste_options(comms, compute, accum, micro_batch)
    rep(WARN, "communication", detail + "; each of these keeps it under 10%: "
        + " | ".join(f"{o} ({f:.0%})" for o, f in options),
        "paste one of the settings above after `pretrain` (compression and sync_every need DDP across the nodes)")
