"""What a training process holds that it does not need (issue 19's peak-memory target against nanoGPT):
- torch.distributed.checkpoint, DTensor and tensor parallel (which pull in FSDP and sympy, ~45 MiB) are imported
  on first use, not by importing the CLI or the trainer;
- token windows read from a memory-mapped split hand their pages back, so the file does not end resident."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from gptforge.data.loader import read_windows

HEAVY = ("torch.distributed.checkpoint", "torch.distributed.tensor", "torch.distributed.fsdp", "sympy")


def test_cli_and_trainer_import_without_checkpoint_and_dtensor_modules():
    code = ("import sys, gptforge.cli, gptforge.train.run, gptforge.train.trainer, gptforge.hf.inference; "
            f"print([m for m in {HEAVY!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
    # and the lazy names still resolve to torch's
    from gptforge import checkpoint
    import torch.distributed.checkpoint as dcp

    assert checkpoint.dcp.save is dcp.save


def _mapping_rss_kib(path) -> int:
    """Resident KiB of this process's mappings of `path` (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if len(head) >= 5 and "-" in head[0] and ":" in head[3]:  # a mapping's first line
                inside = len(head) >= 6 and head[5] == str(path)
            elif inside and line.startswith("Rss:"):
                total += int(head[1])
    return total


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_read_windows_hands_pages_back(tmp_path):
    path = tmp_path / "train.bin"
    tokens = (np.arange(4_000_000) % 50_000).astype(np.uint16)  # 8 MB
    tokens.tofile(path)
    starts = list(range(0, len(tokens) - 65, 997))  # every page of the file is read
    plain = np.memmap(path, dtype=np.uint16, mode="r")
    rows = np.stack([plain[s:s + 65] for s in starts])
    assert _mapping_rss_kib(path) > 4000  # a plain read leaves the file resident: the check can fail
    del plain
    mapped = np.memmap(path, dtype=np.uint16, mode="r")
    got = np.concatenate([read_windows(mapped, starts[i:i + 12], 65) for i in range(0, len(starts), 12)])
    assert got.dtype == np.int64 and np.array_equal(got, rows.astype(np.int64))
    assert _mapping_rss_kib(path) < 256, _mapping_rss_kib(path)
