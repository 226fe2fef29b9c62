"""`gptforge distill` under 2-rank DDP (torchrun, gloo, CPU) equals one process with the same global batch, on
text (token windows) and on conversations (uneven label counts per rank: the loss is the mean over the step's
label tokens on all ranks); and text under FSDP2 (the student sharded; its head, with the distillation loss, runs
inside its forward). Every rank holds the whole teacher and scores its own share of the batch."""

from __future__ import annotations

import json

import pytest

from _harness import torchrun
from conftest import tiny_args
from gptforge.cli import main
from support.stage_fixtures import reverse_conversations, write_jsonl


def rows(run) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"train/kl"' in x]


@pytest.mark.parametrize("kind,strategy", [("text", "ddp"), ("chat", "ddp"), ("text", "fsdp")])
def test_distill_ddp_equals_single_process(kind, strategy, trained_run, char_data, tmp_path):
    chats = reverse_conversations(64, turns=(1, 2, 3))
    data = char_data if kind == "text" else write_jsonl(tmp_path / "chats.jsonl", chats)

    def distill(out, micro_batch):
        a = [x for x in tiny_args(out, data) if not x.startswith(("--model.", "--train.micro_batch"))]
        return ["distill", *a, "--model.n_layer=1", "--model.d_model=32", "--model.n_head=2", "--model.d_ff=64",
                "--model.block_size=32", f"--teacher={trained_run}", f"--train.micro_batch={micro_batch}",
                "--train.max_steps=3", "--train.log_every=1", "--distill.temperature=2", "--data.val_fraction=0",
                f"--parallel.strategy={strategy}"]

    single, ddp = tmp_path / "single", tmp_path / "ddp"
    assert main(distill(single, 4)) == 0
    torchrun(2, distill(ddp, 2), timeout=240)
    a, b = rows(single), rows(ddp)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    for x, y in zip(a, b):
        for k in ("train/loss", "train/kl", "train/ce"):
            assert abs(x[k] - y[k]) < 1e-5, (k, x["step"], x[k], y[k])
    assert a[0]["train/kl"] > 0.1 and a[-1]["train/loss"] < a[0]["train/loss"]
