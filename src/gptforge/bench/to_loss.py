"""`gptforge bench --to-loss A B [C ...]`: how long recipes take to reach the same validation loss.

    gptforge bench --to-loss "" "train.lr=3e-3 train.schedule=wsd" --steps 600 --eval-every 50 \\
        --val-path data/val.txt --json to_loss.json -- --model.preset=micro
    gptforge bench --to-loss "" --baseline-json nanogpt.json --data input_train.txt --val-path input_val.txt

Each recipe (a string of pretrain options, as --compare takes; "" is the defaults) trains for --steps in a fresh
process (``gptforge.bench.device.run_once``) on the same data and validation set (--val-path: data.val_path,
scored whole at every evaluation; else the training data's own split, train.eval_batches batches of it),
evaluating every --eval-every steps. With each val loss the trainer logs the tokens trained and the seconds
spent training so far (train/tokens, train/seconds in metrics.jsonl: the loop's wall time less evaluations and
checkpoint saves). A recipe's curve is those (tokens, seconds, loss) points, one per evaluation, and:

- target: --target-loss, else the baseline's final val loss (the baseline: the first recipe, or --baseline-json);
- to target (`reach`): the first evaluation at or below the target and the one before it bracket it; steps,
  tokens and seconds are interpolated linearly in the loss between the two. Reached at the first evaluation:
  that evaluation's numbers (an upper bound, marked "<="); never reached: "not reached";
- equal tokens: N = the smallest final token count of all recipes (the baseline's included), and each
  recipe's val loss at N, interpolated linearly in tokens between the evaluations around it (`loss_at_tokens`);
- peak memory: as bench --single (GPU: torch.cuda.max_memory_allocated; CPU: peak RSS);
- ratios: seconds and tokens to the target over the baseline's.

--rounds R > 1 runs every recipe R times, the order alternating (A B C, then C B A, ...) so a drift of the
machine weighs on all alike; per evaluation the seconds are the median over the rounds and the loss the mean
(with the same seed the losses agree). An external baseline (--baseline-json, e.g. nanoGPT's train.py log
parsed by a script) is {"name": .., "val_curve": [[tokens, seconds, loss], ...], optional "peak_memory_bytes",
"command"}; it is not run, only compared with.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

from gptforge.bench.device import _strategy, check, fmt_bytes, knobs, run_args, run_once, setting_args, write_json
from gptforge.bench.options import BenchOptions
from gptforge.errors import UserError

# a curve: [(tokens, seconds, loss) or (tokens, seconds, loss, steps), ...], one point per evaluation, in order


def reach(curve, target: float) -> dict | None:
    """Where a curve first gets to `target` or below: {"tokens", "seconds", "steps" (None without steps),
    "at_first_eval"}, interpolated linearly in the loss between the evaluation before the first one at or below
    the target and that one; at the first evaluation: its own numbers; None: never reached."""
    for i, p in enumerate(curve):
        if p[2] > target:
            continue
        steps = p[3] if len(p) > 3 else None
        if i == 0:
            return {"tokens": p[0], "seconds": p[1], "steps": steps, "at_first_eval": True}
        q = curve[i - 1]
        f = (q[2] - target) / (q[2] - p[2])  # q[2] > target >= p[2]: 0 < f <= 1

        def lerp(a, b):
            return a + f * (b - a)

        return {"tokens": lerp(q[0], p[0]), "seconds": lerp(q[1], p[1]),
                "steps": lerp(q[3], p[3]) if steps is not None and len(q) > 3 else None, "at_first_eval": False}
    return None


def loss_at_tokens(curve, tokens: float) -> float | None:
    """The curve's loss at `tokens`, interpolated linearly in tokens between the evaluations around it; None
    before the first evaluation or after the last."""
    for i, p in enumerate(curve):
        if p[0] == tokens:
            return p[2]
        if p[0] > tokens:
            if i == 0:
                return None
            q = curve[i - 1]
            return q[2] + (tokens - q[0]) / (p[0] - q[0]) * (p[2] - q[2])
    return None


def read_curve(run_dir: Path) -> list[tuple[float, float, float, int]]:
    """(tokens, training seconds, val loss, step) of every evaluation a run logged (metrics.jsonl)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    curve = [(r["train/tokens"], r["train/seconds"], r["val/loss"], r["step"]) for r in rows
             if "val/loss" in r and "train/seconds" in r]
    if not curve:
        raise UserError(f"no validation losses in {run_dir / 'metrics.jsonl'}; the run must evaluate "
                        "(--eval-every, and a validation set: --val-path or a training split)")
    return curve


def pool(curves: list[list]) -> list[tuple]:
    """One curve from a recipe's rounds: per evaluation the tokens and step of the first, the median seconds,
    the mean loss (only the evaluations every round reached)."""
    n = min(len(c) for c in curves)
    return [(curves[0][i][0], statistics.median(c[i][1] for c in curves), statistics.fmean(c[i][2] for c in curves),
             *curves[0][i][3:]) for i in range(n)]


def read_baseline(path: str) -> dict:
    """--baseline-json -> {"name", "curve", "peak_memory_bytes", "command"}; UserError (one line) if malformed."""
    fix = 'write {"name": "nanogpt", "val_curve": [[tokens, seconds, loss], ...]} (tokens increasing)'
    try:
        d = json.loads(Path(path).read_text())
    except OSError as e:
        raise UserError(f"--baseline-json {path}: cannot read it ({e.strerror}); {fix}") from None
    except ValueError as e:
        raise UserError(f"--baseline-json {path}: not JSON ({e}); {fix}") from None
    points = d.get("val_curve") if isinstance(d, dict) else None
    ok = isinstance(points, list) and points and all(
        isinstance(p, list) and len(p) in (3, 4) and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                         and math.isfinite(x) for x in p) for p in points)
    if not ok or any(b[0] <= a[0] for a, b in zip(points, points[1:])):
        raise UserError(f"--baseline-json {path}: no usable val_curve; {fix}")
    return {"name": str(d.get("name") or Path(path).stem), "curve": [tuple(p) for p in points],
            "peak_memory_bytes": d.get("peak_memory_bytes"), "command": d.get("command")}


def summarize(rows: list[dict], target: float) -> tuple[list[dict], float]:
    """Fill each row ({"name", "curve", ...}; rows[0] the baseline) with what it took to reach `target`, its
    final numbers, its loss at equal tokens and its ratios to the baseline. -> (rows, equal tokens)."""
    equal = min(r["curve"][-1][0] for r in rows)
    for r in rows:
        last = r["curve"][-1]
        got = reach(r["curve"], target)
        r |= {"reached": got is not None, "at_first_eval": bool(got and got["at_first_eval"]),
              "steps_to_target": got and got["steps"], "tokens_to_target": got and got["tokens"],
              "seconds_to_target": got and got["seconds"], "final_loss": last[2], "final_tokens": last[0],
              "final_seconds": last[1], "final_steps": last[3] if len(last) > 3 else None,
              "loss_at_equal_tokens": loss_at_tokens(r["curve"], equal)}
    base = rows[0]
    for r in rows:
        for k in ("seconds", "tokens"):
            a, b = r[f"{k}_to_target"], base[f"{k}_to_target"]
            r[f"ratio_{k}"] = a / b if a is not None and b else None
    return rows, equal


def _num(v, fmt: str, le: bool = False) -> str:
    return "-" if v is None else ("<=" if le else "") + format(v, fmt)


def format_table(rows: list[dict], target: float, equal: float) -> str:
    head = (f"{'recipe':<12} {'steps':>8} {'tokens':>13} {'train s':>10} {'s ratio':>8} {'final val':>9} "
            f"{'val@equal':>9} {'peak mem':>9}  options")
    lines = [f"to val loss {target:.4f}: steps, tokens, training seconds (evaluation excluded), interpolated; "
             f"val@equal: val loss at {equal:,.0f} tokens", head]
    for r in rows:
        le = r["at_first_eval"]
        ratio = "-" if r["ratio_seconds"] is None else f"{r['ratio_seconds']:.3f}x"
        if r["reached"]:
            reach_cols = (f"{_num(r['steps_to_target'], '.1f', le):>8} {_num(r['tokens_to_target'], ',.0f', le):>13} "
                          f"{_num(r['seconds_to_target'], '.2f', le):>10} {ratio:>8}")
        else:
            reach_cols = f"{'not reached':>42}"
        lines.append(f"{r['name']:<12} {reach_cols} {r['final_loss']:>9.4f} "
                     f"{_num(r['loss_at_equal_tokens'], '.4f'):>9} "
                     f"{fmt_bytes(r.get('peak_memory_bytes')):>9}  {r.get('setting') or '(defaults)'}")
    return "\n".join(lines)


def schedule(names: list[str], rounds: int) -> list[tuple[str, int]]:
    """(recipe, round) in the order they run: A B C, then C B A, ..."""
    return [(n, i + 1) for i in range(rounds) for n in (names if i % 2 == 0 else names[::-1])]


def pretrain_command(a: BenchOptions, name: str, k: dict, extra: list[str]) -> str:
    """The command line that trains this recipe again as the bench ran it (threads, options, out_dir)."""
    args: dict = {}  # one --key=value per key, the last given (as the parser takes them); other words as they are
    for i, x in enumerate(run_args(a, Path("runs/to_loss") / name, k, extra)):
        args[x.split("=", 1)[0] if x.startswith("--") and "=" in x else i] = x
    args = list(args.values())
    launcher = (["python", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1", "-m", "gptforge"]
                if _strategy(args) in ("ddp", "fsdp") else ["gptforge"])
    return f"OMP_NUM_THREADS={a.threads or os.cpu_count() or 1} " + shlex.join([*launcher, "pretrain", *args])


def check_options(a: BenchOptions) -> list[str]:
    """-> the recipes; UserError (one line) for options that do not fit."""
    check(a)
    if a.compare or a.sweep or a.single:
        raise UserError("--to-loss runs on its own: leave out --compare, --sweep and --single")
    recipes = [t.strip() for t in a.to_loss or ()]
    if len(recipes) < (1 if a.baseline_json else 2):
        raise UserError("--to-loss takes two or more recipes (the first is the baseline), or one with --baseline-json; "
                        f"got {len(recipes)}: e.g. --to-loss \"\" \"train.lr=3e-3\"")
    if (a.rounds if a.rounds is not None else 1) < 1:
        raise UserError(f"--rounds must be at least 1, got {a.rounds}")
    if a.eval_every is not None and a.eval_every < 1:
        raise UserError(f"--eval-every must be at least 1, got {a.eval_every}")
    if a.target_loss is not None and not math.isfinite(a.target_loss):
        raise UserError(f"--target-loss must be a finite number, got {a.target_loss}")
    from gptforge.config.loader import parse_config
    from gptforge.train.recipes import pretrain

    for i, text in enumerate(recipes):  # a mistyped option: one line now, not after the runs before it
        try:
            parse_config([*setting_args(text), *a.pretrain], pretrain.defaults)
        except UserError as e:
            raise UserError(f"--to-loss recipe {i + 1} ({text or 'the defaults'}): {e}") from None
    return recipes


def main(a: BenchOptions) -> int:
    recipes = check_options(a)
    external = read_baseline(a.baseline_json) if a.baseline_json else None
    rounds = 1 if a.rounds is None else a.rounds
    every = a.eval_every or max(1, a.steps // 10)
    names = [chr(ord("A") + i) if i < 26 else f"R{i}" for i in range(len(recipes))]
    common = [f"--train.eval_every={every}", f"--train.log_every={every}", "--train.eval_batches=20"]
    common += [f"--data.val_path={a.val_path}"] if a.val_path else []
    extra = {n: [*common, *setting_args(t)] for n, t in zip(names, recipes)}
    runs: dict[str, list[dict]] = {n: [] for n in names}
    curves: dict[str, list] = {n: [] for n in names}
    order: list[str] = []
    with tempfile.TemporaryDirectory(prefix="gptforge-bench-to-loss-") as tmp:
        for n, i in schedule(names, rounds):
            r = run_once(a, Path(tmp), f"{n}{i}", knobs(a), extra[n])
            if r.get("oom"):
                raise UserError(f"recipe {n} ({recipes[names.index(n)] or 'the defaults'}) does not fit in GPU memory; "
                                "lower --micro-batch")
            curve = read_curve(Path(tmp) / f"{n}{i}")
            runs[n].append(r | {"val_curve": [list(p) for p in curve]})
            curves[n].append(curve)
            order.append(r["name"])
    rows = [] if external is None else [{"name": external["name"], "setting": "external baseline (--baseline-json)",
                                         "curve": external["curve"], "peak_memory_bytes": external["peak_memory_bytes"],
                                         "command": external["command"], "external": True}]
    for n, text in zip(names, recipes):
        rows.append({"name": n, "setting": text, "curve": pool(curves[n]), "runs": len(runs[n]),
                     "peak_memory_bytes": max(r["peak_memory_bytes"] for r in runs[n]),
                     "peak_memory_kind": runs[n][0]["peak_memory_kind"], "device": runs[n][0]["device"],
                     "command": pretrain_command(a, n, knobs(a), extra[n]), "external": False})
    target = a.target_loss if a.target_loss is not None else rows[0]["curve"][-1][2]
    rows, equal = summarize(rows, target)
    first = runs[names[0]][0]
    print(f"model {a.preset}{f', context {a.block_size}' if a.block_size else ''}, device {first['device']}; "
          f"{rounds} round(s), order {' '.join(order)}; evaluated every {every} steps on "
          + (f"{a.val_path} (data.val_path)" if a.val_path else "the training data's validation split")
          + f"; peak memory: {first['peak_memory_kind']}")
    print(format_table(rows, target, equal))
    for r in rows:
        print(f"{r['name']}: {r['command'] or '(no command given)'}")
    write_json(a, {"target_loss": target, "target_from": "--target-loss" if a.target_loss is not None else
                   f"the final val loss of {rows[0]['name']}", "equal_tokens": equal, "eval_every": every,
                   "val_path": a.val_path, "rounds": rounds, "order": order,
                   "rows": [{k: v for k, v in r.items() if k != "curve"} | {"val_curve": [list(p) for p in r["curve"]]}
                            for r in rows],
                   "runs": [r for n in names for r in runs[n]]})
    print(f"baseline: {rows[0]['name']}; ratios are time (and tokens) to the target over the baseline's",
          file=sys.stderr)
    return 0
