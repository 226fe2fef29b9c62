"""train.precision=auto on a CPU: bf16 autocast only where it is measured to be faster for this model's shapes.

A CPU with bf16 instructions is not always faster in bf16: autocast casts every weight at every matmul and
the bf16 kernels are fast only with AMX or on some cores (measured, one model each: 1.6x faster than fp32 on
an AMD EPYC with AVX512-BF16 for a mid-sized model, 0.56x on an Intel Xeon with AVX512-BF16 and no AMX, and
1.2-1.45x *slower* on the EPYC for nanoGPT's small shakespeare-char shape). So on a CPU that has bf16,
``auto`` times one transformer block and the LM head of the model, forward and backward, in fp32 and under
bf16 autocast (interleaved, best of a few, about 1-2 s), predicts a step as n_layer x block + head and takes
bf16 only when it is at least ``BF16_MARGIN`` faster (fp32 is the more exact of the two).

The timings are cached per (CPU model, torch version, threads, model shape, micro-batch) in
``<cache dir>/cpu_precision.json`` (``$GPTFORGE_CACHE``, gptforge.data.corpus.cache_dir); a cache that cannot
be read is ignored and rewritten, one that cannot be written only costs the measurement next time. Timings
taken while other processes used the cores (the two best repeats of a precision more than ``NOISE`` apart)
decide this run but are not cached, so a busy moment does not fix the choice for good.

Every rank must train in the same precision. One process per node measures (local rank 0; the others wait
at the collective, so nothing else runs on the cores), and the ranks agree with one all-reduce (MAX) of
[fp32 seconds, bf16 seconds]: a synchronous step is as slow as its slowest node, so the job compares the
slowest node's fp32 with the slowest node's bf16. A node without bf16 reports bf16 as infinitely slow.
Explicit fp32 / bf16 / fp16, GPUs, and CPUs without bf16 keep the static rule (hardware.resolve_precision).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from gptforge.data.corpus import cache_dir
from gptforge.hardware import _cpu_name, cpu_bf16_supported, device_precision

BF16_MARGIN = 0.05  # bf16 must be this much faster (fp32_s / bf16_s >= 1.05) to be chosen
CACHE_NAME = "cpu_precision.json"
BUDGET_S = 1.0  # the timed repetitions stop after this long (at least MIN_REPS of each): ~1-2 s in all
MIN_REPS, MAX_REPS = 3, 6
NOISE = 0.25  # timings whose two best repeats differ by more are used for this run but not cached
MAX_TOKENS = 4096  # rows of the measured matmuls: the run's micro_batch x context, at most this many
MIN_TOKENS = 512  # ... and at least this many (or the run's own, if fewer): the first pass's size
HEAD_ROWS = 256  # the LM head is timed on this many rows and scaled to the block's

measurements = 0  # how many times measure() ran in this process (the cache's tests read it)


def decide(fp32_s: float, bf16_s: float, margin: float = BF16_MARGIN, where: str = "this CPU") -> tuple[str, str]:
    """Measured seconds of the same work in fp32 and under bf16 autocast -> (precision, the reason to print)."""
    if not math.isfinite(bf16_s):
        return "fp32", f"auto: {where} has no native bf16"
    speed = fp32_s / bf16_s if bf16_s > 0 else float("inf")
    if speed >= 1 + margin:
        return "bf16", f"auto: measured {speed:.2f}x faster than fp32 on {where} for these shapes"
    if speed >= 1:
        return "fp32", (f"auto: bf16 measured only {speed:.2f}x fp32's speed on {where} for these shapes "
                        f"(< {1 + margin:.2f}x)")
    return "fp32", f"auto: bf16 measured {speed:.2f}x fp32's speed (slower) on {where} for these shapes"


# ---- the measurement ------------------------------------------------------------------------------------------
def _shape(mcfg, micro_batch: int, max_tokens: int) -> tuple[int, int]:
    """(batch, context) of the measured input: the run's micro-batch x context, at most max_tokens rows."""
    t = mcfg.block_size
    if t > max_tokens:
        return 1, max(16, max_tokens)
    return max(1, min(micro_batch, max_tokens // t)), t


def measure(mcfg, micro_batch: int, budget_s: float = BUDGET_S, max_tokens: int = MAX_TOKENS) -> dict:
    """Seconds of one training step's matmul-heavy work for model config `mcfg` (complete GPTConfig) in fp32 and
    under bf16 autocast: n_layer x (one block, forward + backward) + the LM head with its cross-entropy.
    The input is the run's micro-batch x context, at most max_tokens rows, and fewer (not under MIN_TOKENS) where
    one fp32 pass of them would take longer than budget_s / 6; the LM head is timed on HEAD_ROWS rows and scaled."""
    global measurements
    measurements += 1
    with torch.random.fork_rng(devices=[]):  # the run's random stream (dropout, ...) is the same measured or cached
        return _measure(mcfg, micro_batch, budget_s, max_tokens)


def _measure(mcfg, micro_batch: int, budget_s: float, max_tokens: int) -> dict:
    from gptforge.model.gpt import Block, rope_cache

    cfg = mcfg  # the run's own config, dropout included
    gen = torch.Generator().manual_seed(0)
    block = Block(cfg).train()
    head = torch.nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
    with torch.no_grad():
        for p in [*block.parameters(), *head.parameters()]:
            p.copy_(torch.randn(p.shape, generator=gen) * (0.02 if p.dim() > 1 else 1.0))
    cos_sin = rope_cache(cfg) if cfg.arch == "llama" else None

    def inputs(b: int, t: int):
        rows = min(b * t, HEAD_ROWS)  # the head's time is linear in its rows: measured on a few, scaled
        return (torch.randn(b, t, cfg.d_model, generator=gen), torch.randn(rows, cfg.d_model, generator=gen),
                torch.randint(0, cfg.vocab_size, (rows,), generator=gen),
                (cos_sin[0][:t], cos_sin[1][:t]) if cos_sin else None)

    def run(precision: str) -> tuple[float, float]:
        ctx = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
        xi = x.detach().requires_grad_()
        t0 = time.perf_counter()
        with ctx:
            y = block(xi, rope)
        y.float().square().mean().backward()
        t1 = time.perf_counter()
        h = xh.detach().requires_grad_()
        with ctx:
            logits = head(h)
        F.cross_entropy(logits.float(), targets).backward()  # the objectives upcast the logits (objectives/head.py)
        t2 = time.perf_counter()
        for p in [*block.parameters(), *head.parameters()]:
            p.grad = None
        return t1 - t0, (t2 - t1) * x.shape[0] * x.shape[1] / len(targets)

    # a first pass on few rows (also the warm-up: oneDNN primitives, the allocator), then the run's rows (at most
    # max_tokens) or as many as keep a pass under budget_s / 6: a big model on a small CPU is measured on fewer
    b_run, t_run = _shape(cfg, micro_batch, max_tokens)
    t = min(t_run, MIN_TOKENS)
    b = min(b_run, max(1, MIN_TOKENS // t))
    x, xh, targets, rope = inputs(b, t)
    grow = (budget_s / 6) / max(sum(run("fp32")), 1e-9)
    if grow > 1.5 and (b, t) != (b_run, t_run):
        rows = min(b_run * t_run, int(b * t * grow))
        t = t_run if rows >= t_run else max(t, rows)
        b = max(1, min(b_run, rows // t))
        x, xh, targets, rope = inputs(b, t)
        run("fp32")
    run("bf16")
    steps: dict[str, list[float]] = {"fp32": [], "bf16": []}  # each repeat's n_layer x block + head
    start, reps = time.perf_counter(), 0
    while reps < MAX_REPS and (reps < MIN_REPS or time.perf_counter() - start < budget_s):
        for prec in (("fp32", "bf16") if reps % 2 == 0 else ("bf16", "fp32")):  # interleaved, alternating order
            blk, hd = run(prec)
            steps[prec].append(cfg.n_layer * blk + hd)
        reps += 1
    fp32, bf16 = sorted(steps["fp32"]), sorted(steps["bf16"])
    # the best of each; the second best within NOISE of it, else another process took the cores meanwhile
    spread = max(fp32[1] / fp32[0], bf16[1] / bf16[0]) - 1
    return {"fp32_s": fp32[0], "bf16_s": bf16[0], "tokens": b * t, "reps": reps, "spread": spread}


# ---- the cache ------------------------------------------------------------------------------------------------
def cache_key(mcfg, micro_batch: int) -> str:
    """CPU model, torch version, threads, and a digest of the model's shape and the micro-batch."""
    shape = {k: v for k, v in mcfg.to_dict().items() if k != "preset"} | {"micro_batch": micro_batch}
    digest = hashlib.sha1(json.dumps(shape, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return (f"{_cpu_name()} | torch {torch.__version__} | {torch.get_num_threads()} threads | "
            f"{mcfg.arch} L{mcfg.n_layer} d{mcfg.d_model} T{mcfg.block_size} V{mcfg.vocab_size} "
            f"b{micro_batch} | {digest}")


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _valid(entry) -> bool:
    return (isinstance(entry, dict) and all(isinstance(entry.get(k), (int, float)) and entry[k] > 0
                                            for k in ("fp32_s", "bf16_s")))


def _write(path: Path, data: dict) -> None:
    """Atomically (a reader never sees half a file); an unwritable cache is not an error."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".cpu_precision-", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def _entries(path: Path) -> dict:
    entries = _read(path).get("entries")
    return entries if isinstance(entries, dict) else {}


def cached_timings(mcfg, micro_batch: int, path: Path | None = None) -> tuple[dict, bool]:
    """This CPU's timings for these shapes: from the cache file, else measured and written there.
    -> (timings, True when they came from the cache)."""
    path = Path(path) if path is not None else cache_dir() / CACHE_NAME
    key = cache_key(mcfg, micro_batch)
    if _valid(found := _entries(path).get(key)):
        return found, True
    timings = measure(mcfg, micro_batch)
    if timings["spread"] <= NOISE:  # a busy machine's timings decide this run only: the next one measures again
        entries = _entries(path)  # read again: another run may have added its shapes meanwhile
        entries[key] = {k: timings[k] for k in ("fp32_s", "bf16_s", "tokens", "spread")} | {
            "when": time.strftime("%Y-%m-%d")}
        _write(path, {"format": 1, "entries": entries})
    return timings, False


# ---- the run's precision --------------------------------------------------------------------------------------
def train_precision(requested: str, env, mcfg, micro_batch: int, cache_path: Path | None = None,
                    bf16_supported: bool | None = None) -> tuple[str, str]:
    """train.precision for this run -> (fp32 | bf16 | fp16, why; "" when the rule needs no word). Called on every
    rank with the same arguments; on a CPU with precision=auto all ranks join one all-reduce."""
    if requested != "auto" or env.device.type != "cpu":
        return device_precision(requested, env.device), ""
    has_bf16 = cpu_bf16_supported() if bf16_supported is None else bf16_supported
    if not env.distributed and not has_bf16:
        return "fp32", "auto: this CPU has no native bf16"
    fp32_s, bf16_s, cached, spread = 0.0, 0.0, True, 0.0
    if env.local_rank == 0:  # one measurer per node; the node's other ranks wait at the all-reduce
        if has_bf16:
            timings, cached = cached_timings(mcfg, micro_batch, cache_path)
            fp32_s, bf16_s, spread = timings["fp32_s"], timings["bf16_s"], timings.get("spread", 0.0)
        else:
            bf16_s = math.inf
    where = "this CPU"
    if env.distributed:
        import torch.distributed as dist

        vec = torch.tensor([fp32_s, bf16_s, 0.0 if cached else 1.0, spread], dtype=torch.float64)
        dist.all_reduce(vec, op=dist.ReduceOp.MAX)
        fp32_s, bf16_s, cached, spread = vec[0].item(), vec[1].item(), vec[2].item() == 0, vec[3].item()
        if env.nnodes > 1:
            where = "the slowest node"
            if not math.isfinite(bf16_s):
                return "fp32", "auto: a node's CPU has no native bf16"
    precision, why = decide(fp32_s, bf16_s, where=where)
    if cached:
        return precision, why + f"; cached in {cache_path or cache_dir() / CACHE_NAME}"
    if spread > NOISE:
        return precision, why + f"; the machine was busy (repeats {spread:.0%} apart), not cached"
    return precision, why
