"""One bench run in a fresh process: ``python -m gptforge.bench.worker PEAKS.json <pretrain options>``.

Trains like `gptforge pretrain` (also under torchrun) and then writes what only this process can see to
PEAKS.json (rank 0): peak memory (``torch.cuda.max_memory_allocated`` on a GPU, peak RSS always), the
device, and whether the run ran out of GPU memory (exit status 3), so `bench --sweep` can try a smaller
micro-batch in a new process that no OOM has poisoned."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

OOM_EXIT = 3


def _peaks(oom: bool) -> dict:
    import torch

    from gptforge.hardware import detect, peak_rss_bytes

    info = {"oom": oom, "peak_rss_bytes": peak_rss_bytes(),
            "threads": torch.get_num_threads()}
    try:
        info["device"] = detect().describe()
    except Exception as e:  # a broken driver must not hide the numbers we have
        info["device"] = f"unknown ({type(e).__name__})"
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        info["cuda_max_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
        info["cuda_max_reserved_bytes"] = int(torch.cuda.max_memory_reserved())
    return info


def main(argv: list[str]) -> int:
    import torch

    from gptforge.config.loader import parse_config
    from gptforge.errors import UserError
    from gptforge.train.recipes import pretrain

    out, args = Path(argv[0]), argv[1:]
    oom, rc = False, 0
    try:
        pretrain(parse_config(args, pretrain.defaults, "gptforge pretrain"))
    except UserError as e:
        print(f"gptforge: error: {e}", file=sys.stderr)
        rc = 2
    except torch.OutOfMemoryError as e:
        print(f"bench: out of memory: {str(e).splitlines()[0]}", file=sys.stderr)
        oom, rc = True, OOM_EXIT
    if int(os.environ.get("RANK", "0")) == 0:
        out.write_text(json.dumps(_peaks(oom)) + "\n")
    return rc


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
