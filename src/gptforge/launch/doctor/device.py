"""This node's GPU and collective backend. Every call of the doctor into gptforge.hardware is here and
in gptforge.launch.doctor.advice."""

from __future__ import annotations

import datetime
import os

from gptforge import hardware
from gptforge.launch.doctor.options import DoctorOptions
from gptforge.launch.doctor.report import FAIL, INFO, PASS, WARN, Report


def check_hardware(rep: Report, opts: DoctorOptions) -> hardware.DeviceInfo:
    import torch

    if getattr(torch.version, "hip", None) is not None:
        arch = hardware.rocm_arch_from_kfd()
        need = hardware.hsa_override(arch) if arch else None
        have = os.environ.get("HSA_OVERRIDE_GFX_VERSION")
        if need and not have:
            rep(WARN, "HSA override", f"{arch} usually needs HSA_OVERRIDE_GFX_VERSION={need}",
                f"export HSA_OVERRIDE_GFX_VERSION={need} (gptforge launch sets it for you)")
            os.environ["HSA_OVERRIDE_GFX_VERSION"] = need
        elif have:
            rep(INFO, "HSA override", f"HSA_OVERRIDE_GFX_VERSION={have}" + (f" (recommended for {arch}: {need})" if need else ""))
    try:
        dev = hardware.detect()
    except Exception as e:  # a broken driver shows up here
        rep(FAIL, "GPU", f"device query failed: {e}",
            "check the driver (nvidia-smi / rocm-smi), and in a container --gpus all or --device=/dev/kfd --device=/dev/dri")
        dev = hardware.DeviceInfo("cpu", "CPU", 8 * hardware.GiB)
    if dev.is_gpu:
        rep(PASS, "GPU", dev.describe())
    else:
        rep(WARN if opts.nnodes > 1 else INFO, "GPU", f"no GPU visible, training runs on the CPU: {dev.describe()}",
            "if this node has GPUs: check nvidia-smi / rocm-smi; in Docker add --gpus all (NVIDIA) or "
            "--device=/dev/kfd --device=/dev/dri --group-add video (ROCm)")
    # collective backend in-process (world of one)
    import torch.distributed as dist

    backend = backend_for(opts, dev)
    try:
        store = dist.HashStore()
        dist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=datetime.timedelta(seconds=30))
        t = torch.ones(4, device="cuda" if backend == "nccl" else "cpu")
        dist.all_reduce(t)
        if backend == "nccl":
            torch.cuda.synchronize()
        dist.destroy_process_group()
        rep(PASS, "collective backend", f"{backend} initialises on this node (torch {torch.__version__})")
    except Exception as e:
        rep(FAIL, "collective backend", f"{backend} does not initialise: {str(e).splitlines()[0][:200]}",
            "for NCCL/RCCL check the GPU driver and that torch was built with it; gloo needs a working TCP stack")
    return dev


def backend_for(opts: DoctorOptions, dev: hardware.DeviceInfo) -> str:
    if opts.backend != "auto":
        return opts.backend
    import torch.distributed as dist

    return "nccl" if dev.is_gpu and dist.is_nccl_available() else "gloo"
