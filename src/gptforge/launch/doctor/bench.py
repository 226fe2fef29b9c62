"""Timed collectives and matmuls for the doctor: all-reduce latency and bus bandwidth between the nodes,
achieved matmul TFLOPS on this node."""

from __future__ import annotations

import time

from gptforge.launch.doctor.options import DoctorOptions
from gptforge.launch.doctor.report import INFO, PASS, WARN, Report


def _timed(fn, min_iters: int, min_time: float, max_iters: int = 50) -> float:
    """Median seconds of fn() over at least min_iters calls / min_time seconds (after one warm-up)."""
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < max_iters and (len(times) < min_iters or time.perf_counter() - start < min_time):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


def allreduce(rep: Report, opts: DoctorOptions, device, backend: str) -> tuple[float, float] | None:
    """Latency and bus bandwidth of an all-reduce between the nodes (a WARN under 0.5 Gbit/s)."""
    import torch
    import torch.distributed as dist

    n = opts.nnodes
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run(t):
        def f():
            dist.all_reduce(t)
            sync()
        return f

    small = torch.ones(1, dtype=torch.float32, device=device)
    lat = _synced_time(run(small), 10, 0.3, device)
    results = []
    for mb in sorted({1.0, float(opts.bandwidth_mb)}):
        numel = max(1, int(mb * 1e6 / 4))
        t = torch.ones(numel, dtype=torch.float32, device=device)
        sec = _synced_time(run(t), 3, 1.0, device)
        busbw = numel * 4 * 2 * (n - 1) / n / sec if n > 1 else 0.0
        results.append((mb, sec, busbw))
    if n == 1:
        rep(INFO, "all-reduce", "single node: no inter-node bandwidth to measure")
        return None
    size, sec, busbw = results[-1]
    detail = (f"{backend}, latency {lat * 1e3:.2f} ms; "
              + "; ".join(f"{m:g} MB in {s * 1e3:.0f} ms" for m, s, _ in results)
              + f" -> bus bandwidth {busbw / 1e6:.1f} MB/s = {busbw * 8 / 1e9:.3f} Gbit/s")
    slow = busbw * 8 < 0.5e9
    rep(WARN if slow else PASS, "all-reduce", detail,
        "under 0.5 Gbit/s: check the link speed (ethtool IFACE), that --iface is the fast interface, and "
        "use gradient accumulation (advice below)" if slow else "")
    return lat, busbw


def _synced_time(fn, min_iters: int, min_time: float, device) -> float:
    """Like _timed, but every rank runs the same number of iterations (rank 0 decides)."""
    import torch
    import torch.distributed as dist

    fn()
    times = []
    start = time.perf_counter()
    while True:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        more = torch.tensor([1 if (len(times) < min_iters or time.perf_counter() - start < min_time)
                             and len(times) < 50 else 0], device=device)
        dist.broadcast(more, 0)
        if not int(more.item()):
            break
    times.sort()
    return times[len(times) // 2]


def matmul_tflops(on_gpu: bool, precision: str) -> float:
    """Achieved matmul TFLOPS on this device in ``precision`` (bf16/fp16/fp32; a short measurement)."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    if on_gpu:
        n, device = 4096, "cuda"
    else:
        n, device = 512, "cpu"
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def f():
        a @ b
        sync()

    sec = _timed(f, 3, 0.3)
    return 2 * n**3 / sec / 1e12
