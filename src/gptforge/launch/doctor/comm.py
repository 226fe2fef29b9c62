"""The arithmetic of the doctor's communication advice: bytes each gradient setting sends per optimizer
step, its time on the measured link, and the settings that keep communication under 10% of a step.

- exact DDP: a ring all-reduce of the fp32 gradients, 2 (W-1)/W x 4 P bytes / bus bandwidth, plus
  2 latencies per 25 MB DDP bucket;
- ``--parallel.grad_compression=bf16``: half the bytes;
- ``--parallel.grad_compression=powersgd`` (rank r): each gradient matrix m x n sends r (m + n) fp32 numbers
  instead of m n (matrices that would not shrink 2x, and vectors, go whole, as PyTorch's hook does);
  three all-reduces per bucket (vectors, P, Q) instead of one;
- ``--parallel.sync_every=H``: one exchange every H optimizer steps, the cost divided by H.

A step is ``accum x compute`` (per micro-batch) + comm, counting no overlap of the all-reduce with
backward (DDP does overlap it, so this errs on the safe side). comm <= 10% of the step when
comm <= accum x compute / 9."""

from __future__ import annotations

import math

BUCKET_BYTES = 25e6  # DDP's default bucket_cap_mb
LIMIT = 0.10


def matrix_view(shape: tuple[int, ...]) -> tuple[int, int] | None:
    """The m x n matrix PowerSGD sees for a gradient (rows = first dimension), None for vectors."""
    if len(shape) < 2:
        return None
    return shape[0], math.prod(shape[1:])


def wire_bytes(shapes: list[tuple[int, ...]], compression: str = "none", rank: int = 4) -> int:
    """Bytes one rank contributes to the gradient all-reduce(s) of one optimizer step."""
    numel = sum(math.prod(s) for s in shapes)
    if compression == "bf16":
        return 2 * numel
    if compression != "powersgd":
        return 4 * numel
    total = 0
    for s in shapes:
        mn = matrix_view(s)
        if mn and 2 * rank * (mn[0] + mn[1]) < mn[0] * mn[1]:  # PyTorch's min_compression_rate=2
            total += 4 * rank * (mn[0] + mn[1])
        else:
            total += 4 * math.prod(s)
    return total


def comm_seconds(nbytes: float, world: int, busbw: float, lat: float, calls_per_bucket: int = 1,
                 buckets: int = 1) -> float:
    """Ring all-reduce time of ``nbytes`` per rank over ``world`` ranks at bus bandwidth ``busbw`` (bytes/s)."""
    return 2 * (world - 1) / world * nbytes / busbw + 2 * lat * calls_per_bucket * buckets


def setting_comm(shapes: list[tuple[int, ...]], world: int, busbw: float, lat: float, rank: int = 4) -> dict:
    """Seconds of communication per optimizer step for none, bf16 and powersgd."""
    buckets = max(1, math.ceil(wire_bytes(shapes) / BUCKET_BYTES))
    return {c: comm_seconds(wire_bytes(shapes, c, rank), world, busbw, lat, 3 if c == "powersgd" else 1, buckets)
            for c in ("none", "bf16", "powersgd")}


def fraction(comm: float, compute: float, accum: int, sync_every: int = 1) -> float:
    """Share of an optimizer step spent communicating."""
    c = comm / sync_every
    return c / (accum * compute + c)


def min_accum(comm: float, compute: float) -> int:
    """The smallest accumulation that keeps ``comm`` under 10% of a step."""
    return max(1, math.ceil(comm / compute * (1 - LIMIT) / LIMIT - 1e-9))


def min_sync_every(comm: float, compute: float, accum: int) -> int:
    """The smallest H for --parallel.sync_every=H that keeps communication under 10% of a step."""
    return max(1, math.ceil(comm / (accum * compute) * (1 - LIMIT) / LIMIT - 1e-9))


def paste_options(comms: dict, compute: float, accum: int, micro_batch: int, rank: int = 4) -> list[tuple[str, float]]:
    """Each way to keep communication under 10% with ``accum`` kept (except the first), as (options, share)."""
    out = []
    k = min_accum(comms["none"], compute)
    out.append((f"--train.grad_accum={k} --train.micro_batch={micro_batch}", fraction(comms["none"], compute, k)))
    for c in ("bf16", "powersgd"):
        if fraction(comms[c], compute, accum) <= LIMIT:
            extra = f" --parallel.powersgd_rank={rank}" if c == "powersgd" else ""
            out.append((f"--parallel.strategy=ddp --parallel.grad_compression={c}{extra}",
                        fraction(comms[c], compute, accum)))
    h = min_sync_every(comms["none"], compute, accum)
    out.append((f"--parallel.strategy=ddp --parallel.sync_every={h}", fraction(comms["none"], compute, accum, h)))
    return out
