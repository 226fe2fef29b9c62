"""Shared set-up for the SFT / DPO / chat tests: a synthetic chat task and one fine-tuned checkpoint.

The task: the assistant answers a 4-letter word (letters a-f) with the word reversed; conversations have
one or two turns. HELD_OUT words never occur in the training data, so answering them is generalisation.
The fine-tuned run is made once per session (memoised here, since several test files request it)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from conftest import tiny_args

LETTERS = "abcdef"
HELD_OUT = ("abcd", "fedc", "cafe", "bead", "face", "deaf")
_CACHE: dict[str, Path] = {}


def reverse_conversations(n: int, seed: int = 0, turns=(1, 1, 2), lengths=(4,)) -> list[dict]:
    r = random.Random(seed)

    def word() -> str:
        while True:
            w = "".join(r.choice(LETTERS) for _ in range(r.choice(lengths)))
            if w not in HELD_OUT:
                return w

    out = []
    for _ in range(n):
        msgs = []
        for _ in range(r.choice(turns)):
            w = word()
            msgs += [{"role": "user", "content": w}, {"role": "assistant", "content": w[::-1]}]
        out.append({"messages": msgs})
    return out


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in records), encoding="utf-8")
    return path


def sft_args(out_dir, data, *extra) -> list[str]:
    """tiny_args without data.path (SFT reads JSONL, not a prepared dir)."""
    return [a for a in tiny_args(out_dir, "unused", *extra) if not a.startswith("--data.path=")] + \
        [f"--data.path={data}"]


@pytest.fixture(scope="session")
def sft_reverse_run(tmp_path_factory, trained_run) -> Path:
    """Pretrained tiny char model (conftest's trained_run) -> SFT on the reverse task, 300 steps."""
    if "sft" not in _CACHE:
        from gptforge.cli import main

        root = tmp_path_factory.mktemp("sft_reverse")
        data = write_jsonl(root / "reverse.jsonl", reverse_conversations(800))
        out = root / "run"
        assert main(["sft", *sft_args(out, data, f"--init-from={trained_run}", "--train.max_steps=300",
                                      "--train.micro_batch=8", "--train.warmup_steps=10",
                                      "--train.log_every=50")]) == 0
        _CACHE["sft"] = out
    return _CACHE["sft"]
