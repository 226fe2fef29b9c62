"""Single-process baselines for the distributed tests. Import the fixtures into a test module (no
conftest here: it would shadow tests/conftest.py as module `conftest`); each module trains its own
(~2 s each)."""

from __future__ import annotations

import pytest

from conftest import tiny_args

LLAMA = ["--model.arch=llama", "--model.n_kv_head=2", "--model.bias=false"]
MUON = ["--train.optimizer=muon", "--train.muon_lr=0.02"]


def run_args(out_dir, data_dir, *extra: str) -> list[str]:
    """The tiny model, 10-step LR schedule (5-step runs stop after 5 with the same schedule)."""
    return tiny_args(out_dir, data_dir, "--train.max_steps=10", *extra)


def train_in_process(out_dir, data_dir, *extra: str) -> None:
    from gptforge.cli import main

    assert main(["pretrain", *run_args(out_dir, data_dir, *extra)]) == 0


@pytest.fixture(scope="module")
def base_gpt2(tmp_path_factory, char_data):
    """One process, micro-batch 8 (the global batch every distributed test uses), 10 steps, a
    checkpoint at step 5 (the source of the resume tests' baseline) and 10."""
    out = tmp_path_factory.mktemp("base_gpt2")
    train_in_process(out, char_data, "--train.micro_batch=8", "--train.save_every=5")
    return out


@pytest.fixture(scope="module")
def base_gpt2_muon(tmp_path_factory, char_data):
    """base_gpt2 with train.optimizer=muon (Muon for the block matrices, AdamW for the rest)."""
    out = tmp_path_factory.mktemp("base_gpt2_muon")
    train_in_process(out, char_data, *MUON, "--train.micro_batch=8", "--train.save_every=5")
    return out


def baseline(request, optimizer: str):
    """The one-process run of `optimizer` (adamw: base_gpt2; muon: base_gpt2_muon) for a parametrized test."""
    return request.getfixturevalue("base_gpt2" if optimizer == "adamw" else "base_gpt2_muon")


@pytest.fixture(scope="module")
def base_llama(tmp_path_factory, char_data):
    """Llama style with grouped-query attention (4 query heads, 2 kv heads), 5 of 10 steps."""
    out = tmp_path_factory.mktemp("base_llama")
    train_in_process(out, char_data, *LLAMA, "--train.micro_batch=8", "--train.stop_after=5")
    return out
