"""`gptforge bench`: step time of the same training run single-process, under DDP and under FSDP2.

    gptforge bench                                  # micro model, 2 ranks, micro-batch 8 per rank, CPU
    gptforge bench --nproc 4 --modes single,fsdp -- --model.preset=nano --train.precision=bf16

Every mode trains the same model with the same *per-rank* micro-batch (so DDP/FSDP with N ranks do N
times the work of one process per step); the step time is the median `perf/step_ms` after the warm-up
steps, read from each run's metrics.jsonl. Runs go one after another, side by side in one table, with
the ratio to the single process: the communication + synchronisation overhead of data parallel. Each
process gets the same number of threads (--threads, default cores // nproc) so the comparison is per
rank. Extra `pretrain` options go after `--`.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from gptforge.errors import UserError
from gptforge.options import Passthrough

MODES = ("single", "ddp", "fsdp")


@dataclass
class BenchOptions:
    """Step time of one training run single-process, under DDP and under FSDP2 (pretrain options after --)."""

    modes: str = "single,ddp,fsdp"
    """comma-separated subset of single,ddp,fsdp"""
    nproc: int = 2
    """ranks for ddp / fsdp"""
    steps: int = 20
    """optimizer steps per run"""
    warmup: int = 5
    """steps left out of the median"""
    micro_batch: int = 8
    """sequences per rank per step"""
    preset: str = "micro"
    """model preset"""
    block_size: int | None = None
    """context length (default: the preset's)"""
    precision: str = "fp32"
    """fp32 | bf16 | auto"""
    threads: int | None = None
    """threads per process (default: cores // nproc)"""
    data: str | None = None
    """prepared dataset dir or text (default: built-in Shakespeare)"""
    json: str | None = None
    """also write the results here"""
    pretrain: Passthrough = field(default_factory=list)
    """pretrain options (after --)"""


def _pretrain_args(a: BenchOptions, out_dir: Path) -> list[str]:
    args = [f"--model.preset={a.preset}", f"--train.out_dir={out_dir}", f"--train.micro_batch={a.micro_batch}",
            f"--train.max_steps={a.steps}", f"--train.precision={a.precision}", "--train.log_every=1",
            "--train.eval_every=0", "--train.eval_batches=1", "--train.save_every=0", "--train.keep_last=1",
            "--train.sample_tokens=0", "--train.progress=false", "--train.tensorboard=false",
            "--parallel.timeout_s=120"]
    if a.block_size:
        args.append(f"--model.block_size={a.block_size}")
    if a.data:
        args.append(f"--data.path={a.data}")
    return args + a.pretrain


def _step_ms(run_dir: Path, warmup: int) -> tuple[float, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ms = [r["perf/step_ms"] for r in rows if "perf/step_ms" in r and r.get("step", 0) > warmup]
    if not ms:
        raise UserError(f"no step times after the warm-up in {run_dir}; raise --steps above --warmup")
    return statistics.median(ms), max(ms) - min(ms)


def run_mode(mode: str, a: BenchOptions, root: Path) -> dict:
    out = root / mode
    nproc = 1 if mode == "single" else a.nproc
    threads = a.threads or max(1, (os.cpu_count() or 1) // a.nproc)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(k, None)
    args = ["pretrain", *_pretrain_args(a, out)]
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
        raise UserError(f"the {mode} run failed (exit {r.returncode}):\n{tail}")
    med, spread = _step_ms(out, a.warmup)
    return {"mode": mode, "nproc": nproc, "threads": threads, "step_ms": med, "spread_ms": spread,
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
    if a.steps <= a.warmup:
        raise UserError(f"--steps ({a.steps}) must be larger than --warmup ({a.warmup})")
    with tempfile.TemporaryDirectory(prefix="gptforge-bench-") as tmp:
        results = [run_mode(m, a, Path(tmp)) for m in modes]
    print(f"model {a.preset}, micro-batch {a.micro_batch} per rank, {a.precision}, median of steps "
          f"{a.warmup + 1}..{a.steps}")
    print(format_table(results))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0
