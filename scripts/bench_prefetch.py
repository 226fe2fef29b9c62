#!/usr/bin/env python3
"""How long a training step waits for its batch, with and without the prefetch thread (data/prefetch.py).

    python scripts/bench_prefetch.py [--steps 200] [--micro-batch 16] [--block 1024] [--step-ms 20] [--depth 2]

A TokenLoader over --mb MB of random uint16 tokens (shuffled windows: a random-access gather, like a real
run) feeds a loop whose "step" is --step-ms of work that releases the GIL, as a GPU step's host time is
spent waiting for kernels. The settings alternate in blocks of 20 steps within one run; it prints the mean
wait per step and the mean step time of each. A real run reports the same wait as perf/data_wait_ms."""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from gptforge.data.loader import TokenLoader
from gptforge.data.prefetch import Prefetcher


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--block", type=int, default=1024)
    ap.add_argument("--step-ms", type=float, default=20.0)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--mb", type=float, default=200.0, help="size of the token file")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        n = int(a.mb * 1e6 / 2)
        np.random.default_rng(0).integers(0, 50257, n, dtype=np.uint16).tofile(Path(d) / "train.bin")
        (Path(d) / "meta.json").write_text(json.dumps({"dtype": "uint16", "vocab_size": 50257}))
        loaders = {depth: Prefetcher(TokenLoader(d, "train", a.micro_batch, a.block, seed=depth),
                                     torch.device("cpu"), depth) for depth in (0, a.depth)}
        waits: dict = {k: [] for k in loaders}
        steps: dict = {k: [] for k in loaders}
        for i in range(a.steps):
            depth = list(loaders)[(i // 20) % 2]
            pf = loaders[depth]
            t0 = time.perf_counter()
            pf.next_batch()
            time.sleep(a.step_ms / 1000)  # the step: the GIL is free, as while a GPU runs the step's kernels
            waits[depth].append(pf.take_wait_s() * 1000)
            steps[depth].append((time.perf_counter() - t0) * 1000)
        for pf in loaders.values():
            pf.close()
    print(f"batch {a.micro_batch} x {a.block} tokens from a {a.mb:.0f} MB token file, step {a.step_ms} ms, "
          f"{a.steps} steps alternating in blocks of 20 (first block of each dropped)")
    for depth in loaders:
        w, s = waits[depth][20:], steps[depth][20:]
        print(f"prefetch={depth}: wait {statistics.mean(w):.3f} ms/step (median {statistics.median(w):.3f}), "
              f"step {statistics.mean(s):.2f} ms")


if __name__ == "__main__":
    main()
