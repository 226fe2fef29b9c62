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


@pytest.fixture(scope="session")
def shakespeare_bpe(shakespeare_small):
    """A byte-level BPE of 512 tokens (train-tokenizer's trainer) fitted to the first 100 KB of the corpus."""
    from gptforge.data.tokenizer import train_bpe

    return train_bpe([shakespeare_small.read_text()[:100_000]], 512)


# conftest's TINY_MODEL is GPT-2's block; this makes it Llama's: RoPE, RMSNorm, SwiGLU, grouped-query attention,
# an untied head, no biases
LLAMA_BLOCK = ["--model.arch=llama", "--model.bias=false", "--model.n_kv_head=2", "--model.tie_embeddings=false",
               "--model.d_ff=160"]


@pytest.fixture(scope="session")
def bpe_chat_runs(tmp_path_factory, shakespeare_small, shakespeare_bpe):
    """-> make(arch) -> (pretrain run, SFT run) of a tiny model (arch gpt2 or llama) with the trained BPE:
    150 pretrain steps on the corpus, then 200 SFT steps on the reverse task (it learns it: 'cafe' -> 'efac');
    about 15 s per arch on one core, made once per session."""
    from gptforge.cli import main

    root = tmp_path_factory.mktemp("bpe_chat")
    tok_dir = root / "tokenizer"
    shakespeare_bpe.save(tok_dir)

    def make(arch: str) -> tuple[Path, Path]:
        key = f"bpe-chat-{arch}"
        if key not in _CACHE:
            block = {"gpt2": [], "llama": LLAMA_BLOCK}[arch]
            pre, sft = root / f"{arch}-pretrain", root / f"{arch}-sft"
            assert main(["pretrain", *tiny_args(pre, shakespeare_small, f"--data.tokenizer={tok_dir}", *block,
                                                "--train.max_steps=150", "--train.micro_batch=8")]) == 0
            data = write_jsonl(root / "reverse.jsonl", reverse_conversations(800))
            assert main(["sft", *sft_args(sft, data, f"--init-from={pre}", "--train.max_steps=200",
                                          "--train.micro_batch=8", "--train.warmup_steps=10",
                                          "--train.log_every=50")]) == 0
            _CACHE[key] = (pre, sft)
        return _CACHE[key]

    return make
