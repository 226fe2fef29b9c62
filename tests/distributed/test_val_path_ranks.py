"""data.val_path under torchrun: two FSDP2 ranks (micro-batch 4 each) score the fixed validation set exactly as one
process (micro-batch 8) does: same windows, every token once, the same number of forwards on every rank."""

from __future__ import annotations

import json

import pytest

from distributed._fixtures import run_args, train_in_process
from distributed._harness import torchrun

pytestmark = pytest.mark.timeout(300)


def val_losses(run) -> list[float]:
    return [r["val/loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "val/loss" in r]


def test_two_ranks_give_the_val_loss_of_one_process(tmp_path, char_data, shakespeare_small):
    val = tmp_path / "val.txt"
    val.write_text(shakespeare_small.read_text(encoding="utf-8")[-(9 * 64 + 30):], encoding="utf-8")  # 10 windows
    opts = [f"--data.val_path={val}", "--train.eval_every=5"]
    train_in_process(tmp_path / "one", char_data, "--train.micro_batch=8", *opts)
    job = torchrun(2, ["pretrain", *run_args(tmp_path / "two", char_data, "--train.micro_batch=4",
                                             "--parallel.strategy=fsdp", *opts)])
    assert "all scored at every evaluation" in job.output
    one, two = val_losses(tmp_path / "one"), val_losses(tmp_path / "two")
    assert len(one) == 2 and abs(one[0] - one[1]) > 1e-3
    assert max(abs(a - b) for a, b in zip(one, two)) < 1e-5, (one, two)
