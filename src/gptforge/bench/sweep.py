"""`gptforge bench --sweep`: the largest micro-batch that fits, then the fastest settings at it.

1. Fit: a run at --micro-batch; when it does not fit, the next try is half as large, each in a fresh process
   (an out-of-memory error cannot poison the next try). It fits when it ran without running out of GPU memory
   and, with --max-memory, its peak memory (GPU: max allocated; CPU: peak RSS) is at most the limit.
2. Grid: every combination of --sweep-grid (compile off/on, activation checkpointing off/on, precision fp32/bf16)
   at that micro-batch; the run of step 1 counts as its own combination. A combination that does not fit is
   listed as such. The winner is the one with the most tokens/s; its bench and pretrain options are printed."""

from __future__ import annotations

import itertools
import tempfile
from pathlib import Path

from gptforge.bench.device import (check, fmt_bytes, format_table, header, knobs, parse_size, run_once,
                                   write_json)
from gptforge.bench.options import BenchOptions
from gptforge.errors import UserError

DIMENSIONS = {"compile": "compile", "checkpointing": "ckpt", "precision": "precision"}
PRECISIONS = ("fp32", "bf16")


def parse_grid(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip() and s.strip() != "none"]
    bad = [n for n in names if n not in DIMENSIONS]
    if bad:
        raise UserError(f"--sweep-grid: unknown {', '.join(bad)}; choose from {', '.join(DIMENSIONS)} or none")
    return names


def grid(a: BenchOptions, names: list[str], micro_batch: int) -> list[dict]:
    """Every combination, the options' own first."""
    values = {"compile": [a.compile, not a.compile] if "compile" in names else [a.compile],
              "ckpt": [a.activation_checkpointing, not a.activation_checkpointing] if "checkpointing" in names
              else [a.activation_checkpointing],
              "precision": [a.precision] + [p for p in PRECISIONS if p != a.precision] if "precision" in names
              else [a.precision]}
    return [knobs(a, micro_batch, p, c, k) for c, k, p in itertools.product(values["compile"], values["ckpt"],
                                                                            values["precision"])]


def _fits(row: dict, limit: int | None) -> bool:
    if row.get("oom"):
        return False
    row["over_limit"] = limit is not None and row["peak_memory_bytes"] > limit
    return not row["over_limit"]


def pretrain_options(k: dict) -> str:
    return (f"--train.micro_batch={k['micro_batch']} --train.precision={k['precision']} "
            f"--train.compile={str(k['compile']).lower()} "
            f"--train.activation_checkpointing={str(k['activation_checkpointing']).lower()}")


def main(a: BenchOptions) -> int:
    check(a)
    limit = parse_size(a.max_memory) if a.max_memory else None
    names = parse_grid(a.sweep_grid)
    tries: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="gptforge-bench-sweep-") as tmp:
        root, mb, fit = Path(tmp), a.micro_batch, None
        while mb >= 1 and fit is None:
            row = run_once(a, root, f"fit-mb{mb}", knobs(a, mb))
            tries.append(row)
            if _fits(row, limit):
                fit = row
            else:
                mb //= 2
        if fit is None:
            last = tries[-1]
            why = "runs out of GPU memory" if last.get("oom") else \
                f"peaks at {fmt_bytes(last['peak_memory_bytes'])}, over --max-memory {a.max_memory}"
            raise UserError(f"micro-batch 1 {why}; raise --max-memory, shorten --block-size or add "
                            "--activation-checkpointing")
        results = [fit]
        for i, k in enumerate(grid(a, names, fit["micro_batch"])[1:]):
            row = run_once(a, root, f"grid{i + 1}", k)
            _fits(row, limit)
            results.append(row)
    ok = [r for r in results if not r.get("oom") and not r.get("over_limit")]
    best = max(ok, key=lambda r: r["tokens_per_s"])
    print(header(a, results) + (f"; --max-memory {a.max_memory}" if limit else ""))
    print("micro-batch (largest that fits):")
    print(format_table(tries))
    print("settings at micro-batch", fit["micro_batch"], ":")
    print(format_table(results))
    print(f"fastest: micro-batch {best['micro_batch']}, {best['precision']}, compile "
          f"{'on' if best['compile'] else 'off'}, checkpointing {'on' if best['activation_checkpointing'] else 'off'}: "
          f"{best['tokens_per_s']:,.0f} tokens/s")
    print(f"  bench:    {best['command']}")
    print(f"  pretrain: {pretrain_options(best)}")
    write_json(a, {"micro_batch": fit["micro_batch"], "max_memory_bytes": limit, "tries": tries,
                   "results": results, "best": best})
    return 0
