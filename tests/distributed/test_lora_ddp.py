"""LoRA (lora.rank > 0) under 2-rank DDP and FSDP2 on real torchrun (gloo, CPU) equals one process with the same
global batch: SFT losses step by step, the adapters the ranks save (merged at load) give the same logits; DPO with
LoRA under DDP, its live reference the policy with the adapters off, equals one process with a precomputed one."""

from __future__ import annotations

import json

import pytest
import torch

from distributed.test_stages_ddp import args, assert_same, data, metrics, torchrun  # noqa: F401 - data: fixture
from gptforge.cli import main
from gptforge.checkpoint import checkpoint_dir_of
from gptforge.hf.init_from import load_checkpoint_model

pytest.importorskip("peft")
pytestmark = pytest.mark.timeout(400) if hasattr(pytest.mark, "timeout") else []
LORA = ["--lora.rank=4", "--lora.alpha=8", "--train.lr=1e-2"]


def test_lora_sft_and_dpo_ddp_fsdp_equal_single_process(tmp_path, data):  # noqa: F811
    base = tmp_path / "base"
    assert main(["sft", *args(base, data / "chats.jsonl", "--train.micro_batch=4")]) == 0
    chats, pairs = data / "chats.jsonl", data / "pairs.jsonl"
    single, ddp, fsdp = tmp_path / "single", tmp_path / "ddp", tmp_path / "fsdp"
    common = [f"--init-from={base}", *LORA]
    assert main(["sft", *args(single, chats, "--train.micro_batch=4", *common)]) == 0
    # 2 ranks x micro-batch 1 x 2 accumulation steps: the same 4 sequences per optimizer step
    torchrun(["sft", *args(ddp, chats, "--train.micro_batch=1", "--train.grad_accum=2", *common)])
    torchrun(["sft", *args(fsdp, chats, "--train.micro_batch=1", "--train.grad_accum=2", *common,
                           "--parallel.strategy=fsdp")])
    a = metrics(single)
    assert len({round(r["train/loss"], 6) for r in a}) == len(a)  # it did train
    assert_same(a, metrics(ddp))
    assert_same(a, metrics(fsdp))
    x = torch.randint(0, 20, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = load_checkpoint_model(checkpoint_dir_of(single))(x)
        for run in (ddp, fsdp):  # saved by 2 ranks, merged into the base at load
            d = (load_checkpoint_model(checkpoint_dir_of(run))(x) - want).abs().max().item()
            assert d < 1e-5, (run.name, d)
        rows = json.loads((checkpoint_dir_of(fsdp) / "lora.json").read_text())["train_token_ids"]
        was, now = (load_checkpoint_model(checkpoint_dir_of(r)).tok_emb.weight for r in (base, fsdp))
        assert len(rows) == 2 and (was != now).any(1).nonzero().flatten().tolist() == sorted(rows)  # chat rows

    one, two = tmp_path / "dpo_one", tmp_path / "dpo_two"
    dpo = [*common, "--dpo.beta=0.5"]
    assert main(["dpo", *args(one, pairs, "--train.micro_batch=4", *dpo)]) == 0
    torchrun(["dpo", *args(two, pairs, "--train.micro_batch=2", *dpo, "--dpo.precompute_ref=false")])
    keys = ("train/loss", "train/reward_margin", "train/logps_chosen", "train/logps_rejected")
    assert_same(metrics(one), metrics(two), keys)
    assert abs(metrics(one)[0]["train/loss"] - 0.6931471805599453) < 1e-5
