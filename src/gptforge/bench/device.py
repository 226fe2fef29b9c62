"""`gptforge bench --single`: one device measured. A run is a fresh process (``gptforge.bench.worker``) training
the preset for --steps; the numbers are the steps after --warmup, read from its metrics.jsonl:

- ms/step: the median, and the spread (the 90th minus the 10th percentile);
- tokens/s: tokens per step / median step time; MFU: the same tokens/s times the run's own FLOPs per token
  over its device's peak (``gptforge.hardware.peak_tflops``);
- peak memory: ``torch.cuda.max_memory_allocated`` on a GPU, the process's peak RSS on a CPU;
- loader wait: the median ``perf/data_wait_ms`` when the trainer logs it ('-' otherwise).

``--parallel.strategy=ddp|fsdp`` after ``--`` runs it under torchrun with one process (e.g. FSDP2 on one GPU).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gptforge.bench.options import BenchOptions, check_steps, pretrain_args
from gptforge.errors import UserError

GiB, MiB = 1024**3, 1024**2
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": MiB,
          "g": 1000**3, "gb": 1000**3, "gib": GiB, "t": 1000**4, "tb": 1000**4, "tib": 1024**4}


def parse_size(text: str, what: str = "--max-memory") -> int:
    """'1.5GiB', '800MB', '2e9' -> bytes; UserError naming `what` otherwise."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", str(text).lower())
    if not m or m.group(2) not in _UNITS or float(m.group(1)) <= 0:
        raise UserError(f"{what} {text!r}: give a positive size such as 1.5GiB, 800MB or 2e9 (bytes)")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def fmt_bytes(n: float | None) -> str:
    return "-" if n is None else f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.0f} MiB"


def setting_args(text: str) -> list[str]:
    """One --compare setting ('train.precision=bf16 --train.compile=true') -> pretrain options."""
    return [t if t.startswith("-") else "--" + t for t in shlex.split(text)]


def knobs(a: BenchOptions, micro_batch: int | None = None, precision: str | None = None, compile: bool | None = None,
          ckpt: bool | None = None) -> dict:
    """The settings of one run: the options', with any of them replaced."""
    return {"micro_batch": a.micro_batch if micro_batch is None else micro_batch,
            "precision": a.precision if precision is None else precision,
            "compile": a.compile if compile is None else compile,
            "activation_checkpointing": a.activation_checkpointing if ckpt is None else ckpt}


def run_args(a: BenchOptions, out: Path, k: dict, extra: list[str] = ()) -> list[str]:
    b = BenchOptions(**{**vars(a), "micro_batch": k["micro_batch"], "precision": k["precision"]})
    ours = [f"--train.compile={str(k['compile']).lower()}",
            f"--train.activation_checkpointing={str(k['activation_checkpointing']).lower()}",
            f"--train.device={a.device}"]
    return pretrain_args(b, out, setting=[*ours, *extra])


def bench_command(a: BenchOptions, k: dict, extra: list[str] = ()) -> str:
    """The `gptforge bench --single` line that measures this run again."""
    argv = ["gptforge", "bench", "--single", "--preset", a.preset, "--micro-batch", str(k["micro_batch"]),
            "--precision", k["precision"]]
    argv += ["--block-size", str(a.block_size)] if a.block_size else []
    argv += ["--compile"] if k["compile"] else []
    argv += ["--activation-checkpointing"] if k["activation_checkpointing"] else []
    argv += ["--device", a.device] if a.device != "auto" else []
    argv += ["--threads", str(a.threads)] if a.threads else []
    argv += ["--data", a.data] if a.data else []
    argv += ["--steps", str(a.steps), "--warmup", str(a.warmup)]
    rest = [*extra, *a.pretrain]
    return shlex.join(argv + (["--", *rest] if rest else []))


def _strategy(args: list[str]) -> str:
    found = [x.split("=", 1)[1] for x in args if x.startswith("--parallel.strategy=")]
    return found[-1] if found else "none"


def _quantile(xs: list[float], q: float) -> float:
    if len(xs) < 2:
        return xs[0]
    return statistics.quantiles(xs, n=100, method="inclusive")[round(q * 100) - 1]


def read_run(run_dir: Path, warmup: int) -> dict:
    """The step times after the warm-up and what follows from them (see the module's docstring)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "perf/step_ms" in r and r.get("step", 0) > warmup]
    if not steps:
        raise UserError(f"no step times after the warm-up in {run_dir}; raise --steps above --warmup")
    ms = [r["perf/step_ms"] for r in steps]
    tokens = round(steps[0]["perf/tok_s"] * steps[0]["perf/step_ms"] / 1000)  # tok_s = tokens / step time
    med = statistics.median(ms)
    tok_s = tokens / (med / 1000)
    flops_over_peak = steps[0]["perf/mfu"] / steps[0]["perf/tok_s"] if steps[0].get("perf/mfu") else None
    waits = [r["perf/data_wait_ms"] for r in steps if "perf/data_wait_ms" in r]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    return {"step_ms": med, "spread_ms": _quantile(ms, 0.9) - _quantile(ms, 0.1), "step_times_ms": ms,
            "tokens_per_step": tokens, "tokens_per_s": tok_s,
            "mfu": flops_over_peak * tok_s if flops_over_peak else None,
            "data_wait_ms": statistics.median(waits) if waits else None,
            "final_loss": losses[-1] if losses else None}


def ran_with(out: Path) -> dict:
    """The settings the run resolved (its config.json: what --compare's options and precision=auto became)."""
    try:
        cfg = json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    t = cfg.get("train", {})
    keys = ("micro_batch", "precision", "compile", "activation_checkpointing", "grad_accum")
    return {k: t[k] for k in keys if k in t} | {"block_size": cfg.get("model", {}).get("block_size")}


def run_once(a: BenchOptions, root: Path, name: str, k: dict, extra: list[str] = (), steps: int | None = None) -> dict:
    """One run in a fresh process; {'oom': True, ...} when it ran out of GPU memory, UserError on other failures."""
    out = root / name
    out.mkdir(parents=True, exist_ok=True)
    b = BenchOptions(**{**vars(a), "steps": steps or a.steps})
    args = run_args(b, out, k, list(extra))
    peaks_file = out / "peaks.json"
    worker = ["-m", "gptforge.bench.worker", str(peaks_file), *args]
    if _strategy(args) in ("ddp", "fsdp"):
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
                "--max-restarts=0", *worker]
    else:
        argv = [sys.executable, *worker]
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads or os.cpu_count() or 1), PYTHONUNBUFFERED="1")
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    print(f"bench: {name}: micro-batch {k['micro_batch']}, {k['precision']}, compile {k['compile']}, "
          f"checkpointing {k['activation_checkpointing']}{', then ' + ' '.join(extra) if extra else ''} ...",
          file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
        r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=a.run_timeout)
    except subprocess.TimeoutExpired:
        raise UserError(f"the run {name} took longer than --run-timeout {a.run_timeout:g} s") from None
    peaks = json.loads(peaks_file.read_text()) if peaks_file.exists() else {}
    row = {"name": name, **k, **ran_with(out), "extra": list(extra), "command": bench_command(b, k, list(extra)),
           "wall_s": time.perf_counter() - t0, "device": peaks.get("device")}
    if r.returncode != 0:
        if peaks.get("oom") or "OutOfMemoryError" in r.stderr:
            return row | {"oom": True}
        tail = "\n".join((r.stdout + r.stderr).splitlines()[-30:])
        raise UserError(f"the run {name} failed (exit {r.returncode}):\n{tail}", multiline=True)
    gpu = "cuda_max_allocated_bytes" in peaks
    return row | {"oom": False, "steps": b.steps, "warmup": a.warmup, "threads": peaks.get("threads"),
                  "peak_memory_bytes": peaks["cuda_max_allocated_bytes"] if gpu else peaks.get("peak_rss_bytes"),
                  "peak_memory_kind": "cuda max allocated" if gpu else "peak RSS",
                  "peak_rss_bytes": peaks.get("peak_rss_bytes")} | read_run(out, a.warmup)


def format_table(rows: list[dict]) -> str:
    lines = [f"{'run':<14} {'mb':>4} {'prec':>5} {'cmp':>3} {'ckpt':>4} {'ms/step':>9} {'spread':>8} "
             f"{'tokens/s':>11} {'MFU':>6} {'peak mem':>10} {'loader wait':>11}"]
    for r in rows:
        head = (f"{r['name']:<14} {r['micro_batch']:>4} {r['precision']:>5} {'on' if r['compile'] else 'off':>3} "
                f"{'on' if r['activation_checkpointing'] else 'off':>4}")
        if r.get("oom") or r.get("over_limit"):
            why = "out of GPU memory" if r.get("oom") else f"over --max-memory ({fmt_bytes(r['peak_memory_bytes'])})"
            lines.append(f"{head} does not fit: {why}")
            continue
        mfu = f"{r['mfu'] * 100:.1f}%" if r.get("mfu") else "-"
        wait = f"{r['data_wait_ms']:.1f} ms" if r.get("data_wait_ms") is not None else "-"
        lines.append(f"{head} {r['step_ms']:>9.1f} {r['spread_ms']:>8.1f} {r['tokens_per_s']:>11,.0f} {mfu:>6} "
                     f"{fmt_bytes(r['peak_memory_bytes']):>10} {wait:>11}")
    return "\n".join(lines)


def header(a: BenchOptions, rows: list[dict]) -> str:
    dev = next((r["device"] for r in rows if r.get("device")), "unknown device")
    kind = next((r["peak_memory_kind"] for r in rows if r.get("peak_memory_kind")), "")
    return (f"model {a.preset}{f', context {a.block_size}' if a.block_size else ''}, device {dev}; ms/step: median "
            f"of steps {a.warmup + 1}..{a.steps}, spread p90-p10; peak memory: {kind}")


def write_json(a: BenchOptions, payload: dict) -> None:
    if a.json:
        Path(a.json).write_text(json.dumps(payload, indent=2) + "\n")


def check(a: BenchOptions) -> None:
    check_steps(a)
    if a.micro_batch < 1:
        raise UserError(f"--micro-batch must be at least 1, got {a.micro_batch}")
    if a.nodes != 1:
        raise UserError("--single, --sweep and --compare measure one device on this machine: leave --nodes at 1")


def main(a: BenchOptions) -> int:
    check(a)
    with tempfile.TemporaryDirectory(prefix="gptforge-bench-") as tmp:
        row = run_once(a, Path(tmp), "single", knobs(a))
    if row.get("oom"):
        raise UserError(f"micro-batch {a.micro_batch} does not fit in GPU memory; lower --micro-batch or try --sweep")
    print(header(a, [row]))
    print(format_table([row]))
    print(f"command: {row['command']}")
    write_json(a, {"result": row})
    return 0
