#!/usr/bin/env python3
"""The training loop of two revisions side by side: the same `nano` fp32 run, alternating, in fresh processes.

    git worktree add --detach /tmp/old a73271c
    python scripts/bench_loop.py --old-src /tmp/old/src [--reps 2] [--steps 31]

Variants: ``old`` (the other revision), ``new`` (this checkout), ``new-foreach`` (this checkout with the
non-fused AdamW the old loop used: the loop's own effect). Prints the median ms/step over windows of 10 steps
(steps 20 and 30 of each run), the ratios and whether the losses are bit-identical."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

NEW_SRC = Path(__file__).resolve().parents[1] / "src"
FOREACH = ("import sys, torch, gptforge.train.trainer as T; from gptforge.train import optim as O\n"
           "orig = O.build_optimizer\n"
           "def build(m, t, d):\n"
           "    o = orig(m, t, torch.device('meta'))  # not cuda: no fused flag\n"
           "    o.defaults['fused'] = None\n"
           "    for g in o.param_groups: g['fused'] = None\n"
           "    return o\n"
           "T.build_optimizer = build\n"
           "from gptforge.cli import main; sys.exit(main(sys.argv[1:]))\n")


def run(variant: str, old_src: Path, root: Path, data: Path, steps: int) -> tuple[list[float], list[float]]:
    out = root / variant
    subprocess.run(["rm", "-rf", str(out)], check=True)
    env = dict(os.environ, PYTHONPATH=str(old_src if variant == "old" else NEW_SRC))
    args = ["pretrain", "--model.preset=nano", "--train.micro_batch=16", "--train.precision=fp32", f"--data.path={data}",
            f"--train.out_dir={out}", f"--train.max_steps={steps}", "--train.log_every=10", "--train.eval_every=0",
            "--train.sample_tokens=0", "--train.progress=false", "--train.tensorboard=false", "--train.save_every=0"]
    cmd = ([sys.executable, "-c", FOREACH, *args] if variant == "new-foreach"
           else [sys.executable, "-m", "gptforge", *args])
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    ms = [r["perf/step_ms"] for r in rows if "perf/step_ms" in r and r["step"] in (20, 30)]
    return ms, [r["train/loss"] for r in rows if "train/loss" in r]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--old-src", type=Path, required=True, help="the src/ folder of the other revision")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--steps", type=int, default=31)
    a = p.parse_args()
    variants = ["old", "new", "new-foreach"]
    with tempfile.TemporaryDirectory(prefix="bench-loop-") as tmp:
        root = Path(tmp)
        text = root / "s.txt"
        sys.path.insert(0, str(NEW_SRC))
        from gptforge.data.corpus import shakespeare_path

        text.write_text(shakespeare_path().read_text(encoding="utf-8")[:1_000_000], encoding="utf-8")
        data = root / "data"
        subprocess.run([sys.executable, "-m", "gptforge", "prepare", "--input", str(text), "--tokenizer", "char",
                        "--out", str(data)], check=True, capture_output=True, env=dict(os.environ, PYTHONPATH=str(NEW_SRC)))
        res = {v: ([], []) for v in variants}
        for i in range(a.reps):
            for v in variants:
                ms, losses = run(v, a.old_src, root, data, a.steps)
                res[v][0].extend(ms)
                res[v] = (res[v][0], losses)
                print(f"{v} {i}: {[round(x, 1) for x in ms]} ms/step", flush=True)
    for v in variants:
        print(f"{v}: median {statistics.median(res[v][0]):.1f} ms/step ({len(res[v][0])} windows of 10 steps)")
    base, blosses = statistics.median(res["old"][0]), res["old"][1]
    for v in variants[1:]:
        d = max(abs(x - y) for x, y in zip(blosses, res[v][1]))
        print(f"old/{v}: {base / statistics.median(res[v][0]):.3f}x; losses bit-identical={blosses == res[v][1]}, "
              f"max |diff| {d:.2e}")


if __name__ == "__main__":
    main()
