#!/usr/bin/env python3
"""How long a checkpoint save blocks the training loop, synchronous vs --train.async_save.

    python scripts/bench_save_stall.py [--preset nano] [--steps 24] [--save-every 4] [--out /tmp/stall]

Trains the same small run twice (Shakespeare, CPU or GPU) and prints the per-save stall (perf/save_stall_ms
in metrics.jsonl: the time from the save call until the loop runs again) and the wall time of each run."""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

from gptforge.cli import main


def run(out: Path, preset: str, steps: int, every: int, extra: list[str]) -> tuple[list[float], float]:
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    rc = main(["pretrain", f"--model.preset={preset}", f"--train.out_dir={out}", f"--train.max_steps={steps}",
               f"--train.save_every={every}", "--train.keep_last=2", "--train.micro_batch=4", "--train.eval_every=0",
               "--train.sample_tokens=0", "--train.progress=false", "--train.tensorboard=false",
               "--train.precision=fp32", f"--train.log_every={steps}", *extra])
    assert rc == 0, rc
    wall = time.perf_counter() - t0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["perf/save_stall_ms"] for r in rows if "perf/save_stall_ms" in r], wall


def main_() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="nano")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--save-every", type=int, default=4)
    ap.add_argument("--out", default="/tmp/gptforge_save_stall")
    a = ap.parse_args()
    res = {}
    for name, extra in (("sync", []), ("async", ["--train.async_save"])):
        res[name] = run(Path(a.out) / name, a.preset, a.steps, a.save_every, extra)
    print(f"\npreset {a.preset}, {a.steps} steps, a save every {a.save_every} (the last one included)")
    for name, (stalls, wall) in res.items():
        print(f"{name:>5}: stall per save median {statistics.median(stalls):8.1f} ms, max {max(stalls):8.1f} ms, "
              f"{len(stalls)} saves, run wall {wall:.1f} s | " + " ".join(f"{x:.0f}" for x in stalls))


if __name__ == "__main__":
    main_()
