"""Gradient compression for DDP (`--parallel.grad_compression`), through PyTorch's DDP communication hooks.

A comm hook replaces DDP's all-reduce of one gradient bucket; DDP calls it as soon as the bucket's
gradients are ready during backward, so the compressed all-reduce still overlaps the backward of the
final micro-step (and no_sync micro-steps still send nothing):

- ``bf16``: the bucket is divided by the world size, cast to bfloat16 for the wire (half the bytes),
  summed in bfloat16 and cast back (``bf16_hook`` below: PyTorch's ``default_hooks.bf16_compress_hook``
  does the same but DDP refuses it on anything but NCCL/XCCL, while Gloo sums bfloat16 too).
- ``powersgd``: each gradient matrix M (m x n) is sent as a rank-r product P Q^T, r (m + n) numbers
  instead of m n, with error feedback (what the approximation missed is added to the next step's
  gradient) and warm start (``powerSGD_hook``). Vectors (biases, norms) and matrices that would not
  shrink 2x go uncompressed. The first ``parallel.powersgd_start`` optimizer steps are exact all-reduces:
  early training is the most sensitive to approximate gradients. Its state (error buffers, Q) lives in
  memory only: a resumed run restarts it (exact steps, then fresh error feedback). On Gloo, PowerSGD's
  second all-reduce (Q) is issued from a callback on Gloo's thread and can race the next bucket's first
  all-reduce, so the ranks disagree on the order (Gloo aborts: "Received data size doesn't match"):
  there each bucket waits for the previous bucket's exchange before starting (``one_bucket_at_a_time``),
  which still overlaps each exchange with the backward of the layers before it."""

from __future__ import annotations

import torch
import torch.distributed as dist

from gptforge.errors import UserError

COMPRESSIONS = ("none", "bf16", "powersgd")


def check_compression(parallel_cfg, strategy: str, dp_size: int, tp_size: int) -> None:
    """One line when compression is asked for where there is no DDP all-reduce to compress."""
    kind = parallel_cfg.grad_compression
    if kind == "none":
        return
    if kind not in COMPRESSIONS:
        raise UserError(f"parallel.grad_compression={kind} is not one of {', '.join(COMPRESSIONS)}")
    if strategy != "ddp" or dp_size < 2 or tp_size > 1:
        layout = (f"{strategy}{' + tp' if tp_size > 1 else ''} on {dp_size} data-parallel ranks" if dp_size > 1
                  else "a single data-parallel rank")
        raise UserError(f"parallel.grad_compression={kind} compresses the DDP gradient all-reduce, but this run is "
                        f"{layout}; use --parallel.strategy=ddp with 2 or more processes (no tensor parallel), "
                        "or --parallel.grad_compression=none")
    if kind == "powersgd" and (parallel_cfg.powersgd_rank < 1 or parallel_cfg.powersgd_start < 2):
        raise UserError(f"parallel.powersgd_rank must be >= 1 and parallel.powersgd_start >= 2 (PyTorch's PowerSGD "
                        f"needs two exact steps first), got {parallel_cfg.powersgd_rank} and "
                        f"{parallel_cfg.powersgd_start}")


def bf16_hook(process_group, bucket):  # no annotations: DDP checks them, and `annotations` makes them strings
    """DDP comm hook: all-reduce the bucket's mean in bfloat16, write it back in the gradients' dtype."""
    group = process_group if process_group is not None else dist.group.WORLD
    buf = bucket.buffer()
    wire = buf.div(dist.get_world_size(group)).to(torch.bfloat16)
    fut = dist.all_reduce(wire, group=group, async_op=True).get_future()

    def back(f: torch.futures.Future) -> torch.Tensor:
        buf.copy_(f.value()[0])
        return buf

    return fut.then(back)


def one_bucket_at_a_time(hook):
    """Wrap a comm hook so a bucket's collectives start only after the previous bucket's have finished."""
    pending: list = []

    def run(state, bucket):
        if pending:
            pending.pop().wait()
        fut = hook(state, bucket)
        pending.append(fut)
        return fut

    return run


def register_compression(ddp_model, parallel_cfg) -> str:
    """Install the comm hook on a DDP module; returns a description for the log ('' for none)."""
    kind = parallel_cfg.grad_compression
    if kind == "bf16":
        ddp_model.register_comm_hook(None, bf16_hook)
        return "bf16 gradient all-reduce"
    if kind == "powersgd":
        from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd

        state = psgd.PowerSGDState(process_group=None, matrix_approximation_rank=parallel_cfg.powersgd_rank,
                                   start_powerSGD_iter=parallel_cfg.powersgd_start, min_compression_rate=2,
                                   use_error_feedback=True, warm_start=True)
        hook = psgd.powerSGD_hook
        ddp_model.register_comm_hook(state, one_bucket_at_a_time(hook) if dist.get_backend() == "gloo" else hook)
        return (f"PowerSGD rank {parallel_cfg.powersgd_rank} with error feedback "
                f"(exact all-reduce for the first {parallel_cfg.powersgd_start} steps)")
    return ""
