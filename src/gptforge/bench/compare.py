"""`gptforge bench --compare A B`: two settings measured side by side in one invocation.

Each of --rounds rounds runs both settings, each in a fresh process, alternating the order (A B, B A, A B, ...)
so a machine that speeds up or slows down (other jobs, clocks, caches) weighs on both alike. The step times
after the warm-up of all of a setting's runs are pooled: its median ms/step, tokens/s (tokens per step over that
median), the highest peak memory, and the ratios B/A."""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

from gptforge.bench.device import check, fmt_bytes, header, knobs, run_once, setting_args, write_json
from gptforge.bench.options import BenchOptions
from gptforge.errors import UserError


def schedule(rounds: int) -> list[tuple[str, int]]:
    """(setting, round) in the order they run: A B, then B A, ... (a linear drift weighs on both alike)."""
    return [(n, i + 1) for i in range(rounds) for n in ("AB" if i % 2 == 0 else "BA")]


def pooled(name: str, text: str, runs: list[dict]) -> dict:
    ms = [t for r in runs for t in r["step_times_ms"]]
    med = statistics.median(ms)
    tokens = runs[0]["tokens_per_step"]
    mfus = [r["mfu"] / r["tokens_per_s"] for r in runs if r.get("mfu")]
    return {"name": name, "setting": text, "runs": len(runs), "step_ms": med, "tokens_per_step": tokens,
            "tokens_per_s": tokens / (med / 1000), "mfu": mfus[0] * tokens / (med / 1000) if mfus else None,
            "peak_memory_bytes": max(r["peak_memory_bytes"] for r in runs),
            "peak_memory_kind": runs[0]["peak_memory_kind"], "device": runs[0]["device"],
            "run_medians_ms": [r["step_ms"] for r in runs], "command": runs[0]["command"]}


def format_compare(a_row: dict, b_row: dict, ratio: dict) -> str:
    lines = [f"{'':<3} {'ms/step':>9} {'tokens/s':>11} {'MFU':>6} {'peak mem':>10}  setting"]
    for r in (a_row, b_row):
        mfu = f"{r['mfu'] * 100:.1f}%" if r.get("mfu") else "-"
        lines.append(f"{r['name']:<3} {r['step_ms']:>9.1f} {r['tokens_per_s']:>11,.0f} {mfu:>6} "
                     f"{fmt_bytes(r['peak_memory_bytes']):>10}  {r['setting'] or '(defaults)'}")
    lines.append(f"B/A {ratio['step_ms']:>8.3f}x {ratio['tokens_per_s']:>10.3f}x {'':>6} "
                 f"{ratio['peak_memory']:>9.3f}x  (tokens/s B/A {ratio['tokens_per_s']:.3f}: B is "
                 f"{'faster' if ratio['tokens_per_s'] > 1 else 'slower'})")
    return "\n".join(lines)


def main(a: BenchOptions) -> int:
    check(a)
    rounds = 2 if a.rounds is None else a.rounds
    if rounds < 1:
        raise UserError(f"--rounds must be at least 1, got {rounds}")
    texts = {n: t.strip() for n, t in zip("AB", a.compare)}
    extra = {n: setting_args(t) for n, t in texts.items()}
    runs: dict[str, list[dict]] = {"A": [], "B": []}
    order: list[str] = []
    with tempfile.TemporaryDirectory(prefix="gptforge-bench-compare-") as tmp:
        for n, i in schedule(rounds):
            r = run_once(a, Path(tmp), f"{n}{i}", knobs(a), extra[n])
            if r.get("oom"):
                raise UserError(f"setting {n} ({texts[n]}) does not fit in GPU memory; lower --micro-batch")
            runs[n].append(r)
            order.append(r["name"])
    rows = {n: pooled(n, texts[n], runs[n]) for n in "AB"}
    ratio = {"step_ms": rows["B"]["step_ms"] / rows["A"]["step_ms"],
             "tokens_per_s": rows["B"]["tokens_per_s"] / rows["A"]["tokens_per_s"],
             "peak_memory": rows["B"]["peak_memory_bytes"] / rows["A"]["peak_memory_bytes"]}
    print(header(a, runs["A"]) + f"; {rounds} round(s), order {' '.join(order)}")
    print(format_compare(rows["A"], rows["B"], ratio))
    write_json(a, {"A": rows["A"], "B": rows["B"], "ratio_b_over_a": ratio, "order": order,
                  "runs": runs["A"] + runs["B"]})
    print(f"A: {rows['A']['command']}\nB: {rows['B']['command']}", file=sys.stderr)
    return 0
