"""Peak memory and speed of the LM loss paths (train.loss_impl plain vs chunked), side by side.

Every measurement is a fresh process (peak RSS is per process; on CUDA torch's max_memory_allocated;
on CPU glibc's malloc runs with a fixed mmap threshold, so freed tensors leave the RSS at once and the
peak is the tensors' own, not the allocator's retention of 25-MiB chunk buffers across steps),
and the settings are interleaved repeat by repeat, so a shared machine's load hits them alike: read the
ratios, not the absolute times. Each process: one model forward + loss + backward as warm-up, then
--steps timed ones (no optimizer step: the loss path is what differs).

    python scripts/bench_loss_memory.py                       # nano width, vocab 50304, 8 x 256, fp32 and bf16
    python scripts/bench_loss_memory.py --precision bf16 --device cuda --micro-batch 16 --context 1024 --preset small
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys


def child(a) -> None:
    import time

    import torch

    from gptforge.config.presets import preset_model
    from gptforge.hardware import peak_rss_bytes
    from gptforge.model.gpt import build_model
    from gptforge.objectives.lm import LMObjective

    dev = torch.device(a.device)
    prec, impl = a.precision[0], a.impl[0]  # one of each in a child
    cfg = preset_model(a.preset)
    cfg.vocab_size, cfg.block_size = a.vocab, max(a.context, cfg.block_size)
    model = build_model(cfg, dev, seed=0)
    g = torch.Generator().manual_seed(0)
    batch = {k: torch.randint(0, a.vocab, (a.micro_batch, a.context), generator=g).to(dev)
             for k in ("input_ids", "labels")}
    obj = LMObjective(impl)
    ac = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=prec == "bf16")

    def rss() -> int:
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    base = torch.cuda.memory_allocated() if dev.type == "cuda" else rss()
    times, loss = [], None
    for i in range(a.steps + 1):
        sync()
        t0 = time.perf_counter()
        with ac:
            loss, _ = obj(model, batch)
        loss.backward()
        model.zero_grad(set_to_none=True)
        sync()
        if i:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else peak_rss_bytes()
    print(json.dumps({"ms": 1000 * statistics.median(times), "peak_extra_mib": (peak - base) / 2**20,
                      "loss": loss.item()}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="nano")
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--precision", nargs="+", default=["fp32", "bf16"])
    p.add_argument("--impl", nargs="+", default=["plain", "chunked"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        child(a)
        return
    rows: dict[tuple[str, str], list[dict]] = {}
    for _ in range(a.repeat):
        for prec in a.precision:
            for impl in a.impl:
                cmd = [sys.executable, __file__, "--child", "--preset", a.preset, "--vocab", str(a.vocab),
                       "--micro-batch", str(a.micro_batch), "--context", str(a.context), "--precision", prec,
                       "--impl", impl, "--device", a.device, "--steps", str(a.steps)]
                env = os.environ | {"MALLOC_MMAP_THRESHOLD_": str(1 << 17)}
                out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
                rows.setdefault((prec, impl), []).append(json.loads(out.strip().splitlines()[-1]))
    print(f"{a.preset} width, vocab {a.vocab}, micro-batch {a.micro_batch} x {a.context}, {a.device}, "
          f"{a.repeat} interleaved fresh processes per setting, median of {a.steps} steps each")
    print(f"{'precision':<10}{'loss_impl':<10}{'peak extra MiB':>16}{'ms/step':>10}{'loss':>10}")
    for (prec, impl), rs in rows.items():
        print(f"{prec:<10}{impl:<10}{statistics.median(r['peak_extra_mib'] for r in rs):>16.0f}"
              f"{statistics.median(r['ms'] for r in rs):>10.1f}{rs[0]['loss']:>10.4f}")
    for prec in a.precision:
        if (prec, "plain") in rows and (prec, "chunked") in rows:
            m = {i: statistics.median(r["peak_extra_mib"] for r in rows[prec, i]) for i in ("plain", "chunked")}
            t = {i: statistics.median(r["ms"] for r in rows[prec, i]) for i in ("plain", "chunked")}
            print(f"{prec}: chunked / plain peak memory {m['chunked'] / m['plain']:.2f}, "
                  f"time {t['chunked'] / t['plain']:.2f}")


if __name__ == "__main__":
    main()
