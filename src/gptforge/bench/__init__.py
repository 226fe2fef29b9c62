"""`gptforge bench`: step time of the same training run in several layouts, side by side, with ratios.

    gptforge bench                                  # micro model, 2 ranks, micro-batch 8 per rank, CPU
    gptforge bench --nproc 4 --modes single,fsdp -- --model.preset=nano --train.precision=bf16
    gptforge bench --nodes 2 --rate 100mbit --settings ddp,bf16,powersgd,sync8 -- --train.grad_accum=4
    gptforge bench --single --preset nano --micro-batch 16 --precision bf16 --compile --json nano.json
    gptforge bench --sweep --preset small --precision bf16 --compile --micro-batch 64 --sweep-grid none
    gptforge bench --compare "train.precision=fp32" "train.precision=bf16 train.compile=true" --preset nano
    gptforge bench --to-loss "" "train.lr=3e-3 train.schedule=wsd" --steps 600 --eval-every 50 --val-path val.txt

One device (``--single``, ``--sweep``, ``--compare``: ``gptforge.bench.device``, ``sweep``, ``compare``): ms/step,
tokens/s, MFU, peak memory and loader wait of one run, the largest micro-batch that fits and the fastest
settings, or two settings run interleaved in one invocation with their ratio. ``--to-loss A B ...``
(``gptforge.bench.to_loss``): steps, tokens and training seconds each recipe takes to reach a validation loss.

On one machine (``local``) every mode trains the same model with the same *per-rank* micro-batch, so
DDP/FSDP with N ranks do N times the work of one process per step. With ``--nodes 2`` (``nodes``) two
network namespaces stand for two machines joined by a link of ``--rate``, each with its own folder and
cache, one process each started by `gptforge launch`; every setting is compared with the compute-only
step (one process doing the same per-rank work). Step time is the median ``perf/step_ms`` after the
warm-up steps, read from each run's metrics.jsonl.
"""

from __future__ import annotations

from gptforge.bench import compare, device, local, nodes, sweep, to_loss
from gptforge.bench.options import BenchOptions
from gptforge.errors import UserError


def main(a: BenchOptions) -> int:
    if a.to_loss is not None:
        return to_loss.main(a)
    given = [f for f, v in (("--target-loss", a.target_loss), ("--eval-every", a.eval_every),
                            ("--val-path", a.val_path), ("--baseline-json", a.baseline_json)) if v is not None]
    if given:
        raise UserError(f"{', '.join(given)} {'goes' if len(given) == 1 else 'go'} with --to-loss A B ...; "
                        "add --to-loss or leave them out")
    if a.compare:
        return compare.main(a)
    if a.sweep:
        return sweep.main(a)
    if a.single:
        return device.main(a)
    if a.nodes == 1:
        return local.main(a)
    if a.nodes == 2:
        return nodes.main(a)
    raise UserError(f"--nodes {a.nodes}: bench runs on this machine (1) or on two namespace nodes (2)")
