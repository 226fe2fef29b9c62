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

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gptforge.errors import UserError

MODES = ("single", "ddp", "fsdp")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gptforge bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--modes", default="single,ddp,fsdp", help="comma-separated subset of single,ddp,fsdp")
    p.add_argument("--nproc", type=int, default=2, help="ranks for ddp / fsdp (default 2)")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per run (default 20)")
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the median (default 5)")
    p.add_argument("--micro-batch", type=int, default=8, help="sequences per rank per step (default 8)")
    p.add_argument("--preset", default="micro", help="model preset (default micro)")
    p.add_argument("--block-size", type=int, default=None, help="context length (default: the preset's)")
    p.add_argument("--precision", default="fp32", help="fp32 | bf16 | auto (default fp32)")
    p.add_argument("--threads", type=int, default=None, help="threads per process (default: cores // nproc)")
    p.add_argument("--data", default=None, help="prepared dataset dir or text (default: built-in Shakespeare)")
    p.add_argument("--json", default=None, help="also write the results here")
    return p


def _pretrain_args(a, out_dir: Path, extra: list[str]) -> list[str]:
    args = [f"--model.preset={a.preset}", f"--train.out_dir={out_dir}", f"--train.micro_batch={a.micro_batch}",
            f"--train.max_steps={a.steps}", f"--train.precision={a.precision}", "--train.log_every=1",
            "--train.eval_every=0", "--train.eval_batches=1", "--train.save_every=0", "--train.keep_last=1",
            "--train.sample_tokens=0", "--train.progress=false", "--train.tensorboard=false"]
    if a.block_size:
        args.append(f"--model.block_size={a.block_size}")
    if a.data:
        args.append(f"--data.path={a.data}")
    return args + extra


def _step_ms(run_dir: Path, warmup: int) -> tuple[float, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ms = [r["perf/step_ms"] for r in rows if "perf/step_ms" in r and r.get("step", 0) > warmup]
    if not ms:
        raise UserError(f"no step times after the warm-up in {run_dir}; raise --steps above --warmup")
    return statistics.median(ms), max(ms) - min(ms)


def run_mode(mode: str, a, root: Path, extra: list[str]) -> dict:
    out = root / mode
    nproc = 1 if mode == "single" else a.nproc
    threads = a.threads or max(1, (os.cpu_count() or 1) // a.nproc)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), GPTFORGE_COLLECTIVE_TIMEOUT_S="120")
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(k, None)
    args = ["pretrain", *_pretrain_args(a, out, extra)]
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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    a = build_parser().parse_args(argv)
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise UserError(f"unknown bench mode(s) {', '.join(bad)}; choose from {', '.join(MODES)}")
    if a.nproc < 2 and any(m != "single" for m in modes):
        raise UserError("--nproc must be >= 2 for ddp / fsdp")
    if a.steps <= a.warmup:
        raise UserError(f"--steps ({a.steps}) must be larger than --warmup ({a.warmup})")
    with tempfile.TemporaryDirectory(prefix="gptforge-bench-") as tmp:
        results = [run_mode(m, a, Path(tmp), extra) for m in modes]
    print(f"model {a.preset}, micro-batch {a.micro_batch} per rank, {a.precision}, median of steps "
          f"{a.warmup + 1}..{a.steps}")
    print(format_table(results))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0
