"""Advice for a model preset on this cluster: does it fit (auto-config), and which gradient accumulation
keeps communication under 10% of a step.

Step-time estimate: compute per micro-batch = FLOPs per token (6 x matmul parameters + 12 x layers x
d_model x context, PaLM appendix B) x tokens / (matmul TFLOPS measured here x 0.5 model efficiency);
communication per optimizer step = a ring all-reduce of the fp32 gradients, 2 (W-1)/W x 4 P bytes /
measured bus bandwidth + latency (W = nnodes x GPUs per node). Accumulation k keeps communication under
10% when comm <= 0.1 x (k x compute + comm), i.e. k >= 9 x comm / compute.

The parameter count and FLOPs come from gptforge.model.cost, the fit from gptforge.train.auto: the same
numbers as the MFU in the training log and `--train.auto`.
"""

from __future__ import annotations

import math

from gptforge import hardware
from gptforge.config.presets import preset_model
from gptforge.errors import UserError
from gptforge.launch.doctor.bench import matmul_tflops
from gptforge.launch.doctor.options import DoctorOptions
from gptforge.launch.doctor.report import INFO, PASS, WARN, Report
from gptforge.model import cost
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
    comm = 2 * (world - 1) / world * 4 * P / busbw + 2 * lat * max(1, math.ceil(4 * P / 25e6))  # 25 MB DDP buckets
    tflops = matmul_tflops(dev.is_gpu, hardware.resolve_precision("auto", dev.vendor, dev.bf16)) * 0.5
    compute = cost.flops_per_token(model, seq) * auto.micro_batch * seq / (tflops * 1e12)
    k = max(1, math.ceil(9 * comm / compute))
    frac = comm / (auto.grad_accum * compute + comm)
    detail = (f"preset {opts.preset} ({P / 1e6:.0f}M params, {world} ranks): gradient all-reduce ~{comm:.2f} s per "
              f"optimizer step; compute ~{compute:.2f} s per micro-batch of {auto.micro_batch}x{seq} tokens "
              f"(~{tflops:.1f} TFLOPS effective); accumulation >= {k} keeps communication under 10%")
    if auto.grad_accum >= k:
        rep(PASS, "accumulation", detail + f" (auto-config uses {auto.grad_accum}: {frac:.0%})")
    else:
        rep(WARN, "accumulation", detail + f"; with {auto.grad_accum} communication is {frac:.0%} of a step",
            f"--train.grad_accum={k} --train.micro_batch={auto.micro_batch} (effective batch "
            f"{k * auto.micro_batch * world} sequences), or a faster network")
