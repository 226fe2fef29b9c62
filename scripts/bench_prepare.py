#!/usr/bin/env python3
"""`gptforge prepare` against the tokenizer's own batch rate, at 1 and at all cores, side by side.

    python scripts/bench_prepare.py [--input big.txt | --mb 30] [--tokenizer gpt2] [--cores 1 2] [--repeats 2]

Without --input, builds --mb MB of English text from the built-in Shakespeare (its paragraphs shuffled and
repeated, seed 0; no download beyond the corpus gptforge fetches anyway). Every measurement runs in a fresh
process with RAYON_NUM_THREADS=cores (the tokenizer's thread pool), the settings interleaved:
  library  `tokenizers.Tokenizer.encode_batch` over the text's paragraphs (split at blank lines), in batches
           of ~1 MB, with the same tokenizer.json: encoding time only, the file already in memory
  prepare  gptforge's tokenizing pass (read, encode, write train.bin/val.bin), as `prepare` reports it
and prints MB/s, tokens/s and the ratio prepare / library for each core count (best of --repeats), and
the CPU time per MB of each (the work done, which other load on the cores does not change much).
On a shared machine only the ratios of runs made side by side mean much."""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def build_corpus(path: Path, mb: float) -> None:
    from gptforge.data.corpus import checked_cache_dir, shakespeare_path

    paras = [p for p in shakespeare_path(checked_cache_dir()).read_text().split("\n\n") if p.strip()]
    rng, out, n, limit = random.Random(0), [], 0, int(mb * 1e6)
    while n < limit:
        rng.shuffle(paras)
        s = "\n\n".join(paras) + "\n\n"
        out.append(s)
        n += len(s)
    path.write_text("".join(out)[:limit])


def child_library(text_file: str, tokenizer: str) -> dict:
    from gptforge.data.tokenizer import build_tokenizer

    hf = build_tokenizer(tokenizer).hf
    raw = Path(text_file).read_bytes()
    paras = [p + "\n\n" for p in raw.decode().split("\n\n")]
    batches, cur, size = [], [], 0
    for p in paras:
        cur.append(p)
        size += len(p)
        if size >= 1 << 20:
            batches.append(cur)
            cur, size = [], 0
    batches.append(cur)
    tokens, t0, c0 = 0, time.perf_counter(), _cpu()
    for b in batches:
        tokens += sum(len(e.ids) for e in hf.encode_batch(b, add_special_tokens=False))
    return {"bytes": len(raw), "tokens": tokens, "seconds": time.perf_counter() - t0, "cpu_s": _cpu() - c0}


def _cpu() -> float:
    """CPU seconds of this process, all threads (the work done, whatever else shares the cores)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def child_prepare(text_file: str, tokenizer: str) -> dict:
    from gptforge.data.prepare import prepare

    stats: dict = {}
    c0 = _cpu()
    with tempfile.TemporaryDirectory() as out:
        prepare([text_file], out, tokenizer, progress=False, stats=stats)
    return stats | {"cpu_s": _cpu() - c0}  # (includes loading the tokenizer: a fraction of a second)


def measure(mode: str, cores: int, text_file: str, tokenizer: str) -> dict:
    env = dict(os.environ, RAYON_NUM_THREADS=str(cores), TOKENIZERS_PARALLELISM="true")
    r = subprocess.run([sys.executable, __file__, "--child", mode, "--input", text_file, "--tokenizer", tokenizer],
                       env=env, capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", help="a text file (default: build --mb MB from Shakespeare)")
    ap.add_argument("--mb", type=float, default=30.0)
    ap.add_argument("--tokenizer", default="gpt2")
    ap.add_argument("--cores", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--child", choices=["library", "prepare"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps((child_library if a.child == "library" else child_prepare)(a.input, a.tokenizer)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        text_file = a.input
        if text_file is None:
            text_file = str(Path(tmp) / "corpus.txt")
            build_corpus(Path(text_file), a.mb)
        mb = Path(text_file).stat().st_size / 1e6
        print(f"{text_file}: {mb:.1f} MB, tokenizer {a.tokenizer}, best of {a.repeats}, settings interleaved")
        best: dict = {}
        for rep in range(a.repeats):
            for cores in a.cores:
                for mode in (("library", "prepare") if rep % 2 == 0 else ("prepare", "library")):
                    r = measure(mode, cores, text_file, a.tokenizer)
                    rate = r["bytes"] / 1e6 / r["seconds"]
                    print(f"  run {rep + 1} cores {cores} {mode:8s} {rate:6.2f} MB/s {r['tokens'] / r['seconds']:>10,.0f} "
                          f"tokens/s ({r['seconds']:.1f} s, {r['cpu_s'] / mb:.2f} CPU-s/MB)", flush=True)
                    key = (cores, mode)
                    if key not in best or r["seconds"] < best[key]["seconds"]:
                        best[key] = r
        print(f"{'cores':>5} | {'library MB/s':>12} | {'prepare MB/s':>12} | {'prepare tokens/s':>16} | prepare/library")
        for cores in a.cores:
            lib, ours = best[(cores, "library")], best[(cores, "prepare")]
            lr, orate = lib["bytes"] / 1e6 / lib["seconds"], ours["bytes"] / 1e6 / ours["seconds"]
            print(f"{cores:>5} | {lr:>12.2f} | {orate:>12.2f} | {ours['tokens'] / ours['seconds']:>16,.0f} | {orate / lr:.2f}x"
                  f" (CPU time per MB: library/prepare {lib['cpu_s'] / ours['cpu_s']:.2f}x)")
        if len(a.cores) > 1:
            lo, hi = min(a.cores), max(a.cores)
            for mode in ("library", "prepare"):
                s = best[(lo, mode)]["seconds"] / best[(hi, mode)]["seconds"]
                print(f"{mode}: {hi} cores / {lo} core speed-up {s:.2f}x")


if __name__ == "__main__":
    main()
