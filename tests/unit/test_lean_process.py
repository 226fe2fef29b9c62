"""What a training process holds that it does not need (issue 19's peak-memory target against nanoGPT):
- torch.distributed.checkpoint, DTensor and tensor parallel (which pull in FSDP and sympy, ~45 MiB) are imported
  on first use, not by importing the CLI or the trainer;
- a pretraining run on prepared token files never builds its tokenizer (the `tokenizers` library ~6 MiB, a GPT-2
  tokenizer ~17 MiB more), nor imports safetensors, a TOML parser or DTensor's context-parallel / FlexAttention;
- token windows read from a memory-mapped split hand their pages back, so the file does not end resident."""

from __future__ import annotations

import json
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


NOT_IN_PRETRAIN = ("tokenizers", "safetensors", "tomllib", "torch.nn.attention.flex_attention",
                   "torch.distributed.tensor.experimental")


def test_pretrain_on_prepared_tokens_loads_no_tokenizer(tmp_path, char_data):
    from conftest import tiny_args

    out = tmp_path / "run"
    code = ("import atexit, json, sys; from gptforge.cli import main; "
            f"atexit.register(lambda: print('MODULES=' + json.dumps([m for m in {NOT_IN_PRETRAIN!r} "
            "if m in sys.modules]))); sys.exit(main(sys.argv[1:]))")
    args = ["pretrain", *tiny_args(out, char_data, "--train.max_steps=3", "--train.eval_every=3")]
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "saved checkpoint" in r.stdout + r.stderr  # the end's save ran (it writes the tokenizer too)
    assert json.loads(r.stdout.split("MODULES=")[-1]) == []
    ckpt = sorted((out / "checkpoints").glob("step_*"))[-1]
    assert (ckpt / "tokenizer.json").read_bytes() == (char_data / "tokenizer.json").read_bytes()
    # and the control: sampling text at the end does build it (the check above can fail)
    r = subprocess.run([sys.executable, "-c", code, *args, "--train.sample_tokens=8",
                        f"--train.out_dir={tmp_path / 'run2'}"], capture_output=True, text=True)
    assert r.returncode == 0 and json.loads(r.stdout.split("MODULES=")[-1]) == ["tokenizers"], r.stdout[-500:]


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
