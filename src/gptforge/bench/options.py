"""`gptforge bench` options, the pretrain command line every run shares, and what a run leaves behind."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from gptforge.errors import UserError
from gptforge.options import Passthrough


@dataclass
class BenchOptions:
    """Step time of one training run single-process, under DDP and under FSDP2, or across two network-namespace
    nodes with a rate-limited link; or (--single, --sweep, --compare A B) one device measured: ms/step,
    tokens/s, MFU, peak memory, loader wait; or (--to-loss A B ...) the time recipes take to reach a validation
    loss (pretrain options after --)."""

    single: bool = False
    """one device: N steps after the warm-up with the given micro-batch, context, precision, compile,
    checkpointing; prints a table (--json: the numbers); --parallel.strategy=fsdp after -- runs it under torchrun"""
    sweep: bool = False
    """one device: the largest micro-batch that fits (halving from --micro-batch), then the fastest of
    --sweep-grid at it; prints the winner's command line"""
    compare: tuple[str, str] | None = None
    """one device: two settings of pretrain options, run interleaved for --rounds and compared, e.g.
    --compare "train.precision=fp32" "train.precision=bf16 train.compile=true" (leading -- optional)"""
    to_loss: tuple[str, ...] | None = None
    """one device: two or more recipes (each a string of pretrain options, as --compare takes; the first is the
    baseline) trained on the same data and validation set, side by side: steps, tokens and training seconds
    (evaluation excluded) to reach --target-loss, interpolated between evaluations, the val loss at equal
    tokens, peak memory; e.g. --to-loss "" "train.optimizer=muon" --steps 600 --eval-every 50"""
    target_loss: float | None = None
    """--to-loss: the validation loss to reach (default: the baseline's final val loss)"""
    eval_every: int | None = None
    """--to-loss: evaluate every this many steps (train.eval_every; default: --steps / 10)"""
    val_path: str | None = None
    """--to-loss: the validation text of every recipe (data.val_path; default: the training data's own split)"""
    baseline_json: str | None = None
    """--to-loss: an external baseline, {"name": .., "val_curve": [[tokens, seconds, loss], ...]} (e.g. parsed from
    nanoGPT's log): it becomes the baseline and every recipe of --to-loss is compared with it"""
    rounds: int | None = None
    """--compare, --to-loss: rounds of the settings, the order alternating (A B, then B A, ... so a drift of the
    machine cancels); default 2 for --compare, 1 for --to-loss"""
    compile: bool = False
    """one device: torch.compile the model"""
    activation_checkpointing: bool = False
    """one device: recompute activations in the backward pass"""
    device: str = "auto"
    """one device: auto | cpu | cuda | cuda:N"""
    max_memory: str | None = None
    """--sweep: a run fits when its peak memory is at most this (e.g. 1.5GiB, 800MB; CPU: peak RSS);
    on a GPU an out-of-memory error alone also marks it as not fitting"""
    sweep_grid: str = "compile,checkpointing,precision"
    """--sweep: settings tried at the chosen micro-batch (comma list of compile, checkpointing, precision;
    none: only the micro-batch)"""

    modes: str = "single,ddp,fsdp"
    """comma-separated subset of single,ddp,fsdp (one machine)"""
    nproc: int = 2
    """ranks for ddp / fsdp (one machine)"""
    nodes: int = 1
    """1: runs on this machine; 2: two network-namespace nodes, one process each (needs root, `ip`, `tc`)"""
    rate: str | None = None
    """--nodes 2: link rate of each node, a tc rate such as 100mbit or 1gbit (default: not limited)"""
    settings: str = "ddp,bf16,powersgd,sync8"
    """--nodes 2: comma-separated settings to compare (ddp, bf16, powersgd, sync4, sync8, sync16, fsdp, auto)"""
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
    """fp32 | bf16 | fp16 (GPU) | auto"""
    threads: int | None = None
    """threads per process (default: cores // processes; one device: all cores)"""
    data: str | None = None
    """prepared dataset dir or text (default: built-in Shakespeare)"""
    run_timeout: float = 3600
    """--nodes 2: seconds one setting may run before it is stopped (reported as failed)"""
    json: str | None = None
    """also write the results here"""
    pretrain: Passthrough = field(default_factory=list)
    """pretrain options (after --)"""


def pretrain_args(a: BenchOptions, out_dir: Path | str, data: str | None = None, setting: list[str] = ()) -> list[str]:
    """The pretrain options of one run: ours, then the setting's, then the user's (after --: they win)."""
    args = [f"--model.preset={a.preset}", f"--train.out_dir={out_dir}", f"--train.micro_batch={a.micro_batch}",
            f"--train.max_steps={a.steps}", f"--train.precision={a.precision}", "--train.log_every=1",
            "--train.eval_every=0", "--train.eval_batches=1", "--train.save_every=0", "--train.keep_last=1",
            "--train.sample_tokens=0", "--train.progress=false", "--train.tensorboard=false",
            "--parallel.timeout_s=120"]
    if a.block_size:
        args.append(f"--model.block_size={a.block_size}")
    if data or a.data:
        args.append(f"--data.path={data or a.data}")
    return args + list(setting) + a.pretrain


def read_metrics(run_dir: Path, warmup: int) -> dict:
    """Median, mean and spread of ``perf/step_ms`` after the warm-up steps, and the last training loss. The
    mean counts settings whose cost falls on a few steps (sync_every=H: one exchange every H steps)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ms = [r["perf/step_ms"] for r in rows if "perf/step_ms" in r and r.get("step", 0) > warmup]
    if not ms:
        raise UserError(f"no step times after the warm-up in {run_dir}; raise --steps above --warmup")
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    return {"step_ms": statistics.median(ms), "mean_ms": statistics.fmean(ms), "spread_ms": max(ms) - min(ms),
            "final_loss": losses[-1] if losses else None}


def check_steps(a: BenchOptions) -> None:
    if a.steps <= a.warmup:
        raise UserError(f"--steps ({a.steps}) must be larger than --warmup ({a.warmup})")
