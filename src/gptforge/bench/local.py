"""`gptforge bench` on one machine: single process, DDP and FSDP2 runs one after another (see gptforge.bench).
Each process gets the same number of threads (--threads, default cores // nproc) so the comparison is per
rank."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gptforge.bench.options import BenchOptions, check_steps, pretrain_args, read_metrics
from gptforge.errors import UserError

MODES = ("single", "ddp", "fsdp")


def run_mode(mode: str, a: BenchOptions, root: Path) -> dict:
    out = root / mode
    nproc = 1 if mode == "single" else a.nproc
    threads = a.threads or max(1, (os.cpu_count() or 1) // a.nproc)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(k, None)
    args = ["pretrain", *pretrain_args(a, out)]
    if mode == "single":
        argv = [sys.executable, "-m", "gptforge", *args]
    else:
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                "--max-restarts=0", "-m", "gptforge", *args, f"--parallel.strategy={mode}"]
    print(f"bench: {mode} ({nproc} process{'es' if nproc > 1 else ''}, {threads} thread(s) each) ...",
          file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    r = subprocess.run(argv, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        tail = "\n".join((r.stdout + r.stderr).splitlines()[-30:])
        raise UserError(f"the {mode} run failed (exit {r.returncode}):\n{tail}", multiline=True)
    m = read_metrics(out, a.warmup)
    return {"mode": mode, "nproc": nproc, "threads": threads, **m,
            "seqs_per_step": a.micro_batch * nproc, "wall_s": time.perf_counter() - t0}


def format_table(results: list[dict]) -> str:
    base = next((r["step_ms"] for r in results if r["mode"] == "single"), None)
    lines = [f"{'mode':<8} {'ranks':>5} {'thr':>4} {'seq/step':>8} {'step ms':>9} {'vs single':>9} "
             f"{'tok/s/rank vs single':>21}"]
    for r in results:
        ratio = f"{r['step_ms'] / base:.2f}x" if base else "-"
        eff = f"{base / r['step_ms'] * 100:.0f}%" if base else "-"
        lines.append(f"{r['mode']:<8} {r['nproc']:>5} {r['threads']:>4} {r['seqs_per_step']:>8} "
                     f"{r['step_ms']:>9.1f} {ratio:>9} {eff:>21}")
    return "\n".join(lines)


def main(a: BenchOptions) -> int:
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise UserError(f"unknown bench mode(s) {', '.join(bad)}; choose from {', '.join(MODES)}")
    if a.nproc < 2 and any(m != "single" for m in modes):
        raise UserError("--nproc must be >= 2 for ddp / fsdp")
    check_steps(a)
    with tempfile.TemporaryDirectory(prefix="gptforge-bench-") as tmp:
        results = [run_mode(m, a, Path(tmp)) for m in modes]
    print(f"model {a.preset}, micro-batch {a.micro_batch} per rank, {a.precision}, median of steps "
          f"{a.warmup + 1}..{a.steps}")
    print(format_table(results))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0
