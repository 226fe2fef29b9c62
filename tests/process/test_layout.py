"""The data-parallel layout across nodes (gptforge.parallel.layout), with fake world sizes and devices."""

from __future__ import annotations

import types

import pytest
import torch

from gptforge.config.loader import resolve_model
from gptforge.config.presets import preset_model
from gptforge.config.schema import Config
from gptforge.errors import UserError
from gptforge.hardware import FIT_FRACTION, GiB, DeviceInfo
from gptforge.model import cost
from gptforge.parallel.layout import choose_layout, describe, replicated_need, settle_layout
from gptforge.parallel.mesh import DistEnv, layout_pending, node_counts
from gptforge.train import auto

CPU16 = DeviceInfo("cpu", "test cpu", 16 * GiB)
GPU24 = DeviceInfo("cuda", "test gpu", 24 * GiB, "sm_89", bf16=True)


def nano(**train) -> tuple[Config, object]:
    cfg = Config()
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg, resolve_model(cfg.model, 65)


GPT2_BLOCK = dict(arch="gpt2", qk_norm=False, bias=True)  # the sizes below were chosen for GPT-2's block


def preset(name: str, **train) -> tuple[Config, object]:
    cfg, _ = nano(**train)
    cfg.model = preset_model(name, **GPT2_BLOCK)
    cfg.model.d_ff = 4 * cfg.model.d_model
    return cfg, resolve_model(cfg.model, 50304)


def shape(lay) -> tuple[str, int, int, int]:
    return lay.strategy, lay.dp_replicate, lay.dp_shard, lay.tp


def test_node_counts_from_torchrun_environment():
    assert node_counts(4, {"LOCAL_WORLD_SIZE": "2"}) == (2, 2)
    assert node_counts(2, {"LOCAL_WORLD_SIZE": "1"}) == (2, 1)
    assert node_counts(16, {"LOCAL_WORLD_SIZE": "8"}) == (2, 8)
    assert node_counts(4, {}) == (1, 4)  # not under torchrun: one node
    assert node_counts(3, {"LOCAL_WORLD_SIZE": "2"}) == (1, 3)  # uneven: treated as one node


def test_pending_only_for_auto_with_default_sizes_on_several_nodes():
    par = Config().parallel
    assert layout_pending(par, 2) and not layout_pending(par, 1)
    for key, value in (("strategy", "fsdp"), ("strategy", "ddp"), ("dp_shard", 2), ("dp_replicate", 2)):
        p = Config().parallel
        setattr(p, key, value)
        assert not layout_pending(p, 2), (key, value)


def test_one_node_keeps_fsdp_over_its_ranks():
    cfg, m = nano()
    assert shape(choose_layout(cfg, m, 4, 1, 4, CPU16)) == ("fsdp", 1, 4, 1)
    assert choose_layout(cfg, m, 4, 1, 4, CPU16).reason == "one node: auto shards over its ranks"
    cfg.parallel.strategy = "ddp"
    assert shape(choose_layout(cfg, m, 4, 1, 4, CPU16)) == ("ddp", 1, 4, 1)


def test_two_nodes_ddp_when_the_model_fits_replicated():
    cfg, m = nano()
    need, budget = replicated_need(cfg, m, 2, CPU16)
    assert budget == int(16 * GiB * FIT_FRACTION) == int(16 * GiB * 0.88)
    assert need == cost.estimate_memory(m, 32, m.block_size, "fp32", world_size=2, shard=1, device="cpu")
    lay = choose_layout(cfg, m, 2, 2, 1, CPU16)
    assert shape(lay) == ("ddp", 2, 1, 1)
    assert lay.reason == (f"the model (est {need / GiB:.1f} GiB/rank of a {budget / GiB:.1f} GiB budget) fits "
                          "replicated; FSDP would send parameters over the inter-node link every step")
    assert shape(choose_layout(cfg, m, 16, 2, 8, CPU16)) == ("ddp", 16, 1, 1)


def test_hsdp_when_it_only_fits_sharded_inside_a_node():
    cfg, m = preset("large", micro_batch=8)  # ~35 GiB replicated, ~21 GiB sharded over 8, on 24 GiB GPUs
    lay = choose_layout(cfg, m, 16, 2, 8, GPU24)
    assert shape(lay) == ("fsdp", 2, 8, 1)
    assert "does not fit replicated" in lay.reason and "HSDP shards it over the 8 ranks of a node" in lay.reason
    assert shape(choose_layout(cfg, m, 32, 4, 8, GPU24)) == ("fsdp", 4, 8, 1)


def test_fsdp_over_all_ranks_only_when_needed():
    cfg, m = preset("large", micro_batch=8)
    small_gpu = DeviceInfo("cuda", "small", 16 * GiB, bf16=True)
    lay = choose_layout(cfg, m, 16, 2, 8, small_gpu)
    assert shape(lay) == ("fsdp", 1, 16, 1) and "nor sharded inside one node" in lay.reason
    # one rank per node: nothing to shard inside a node
    assert shape(choose_layout(cfg, m, 2, 2, 1, GPU24)) == ("fsdp", 1, 2, 1)


def test_explicit_choices_are_kept_across_nodes():
    cfg, m = nano()
    cfg.parallel.strategy = "fsdp"
    lay = choose_layout(cfg, m, 2, 2, 1, CPU16)
    assert shape(lay) == ("fsdp", 1, 2, 1) and lay.reason.startswith("FSDP across nodes as asked")
    cfg.parallel.strategy = "ddp"
    assert shape(choose_layout(cfg, m, 2, 2, 1, CPU16)) == ("ddp", 1, 2, 1)
    cfg.parallel.strategy, cfg.parallel.dp_replicate, cfg.parallel.dp_shard = "auto", -1, 4
    assert shape(choose_layout(cfg, m, 8, 2, 4, CPU16)) == ("fsdp", 2, 4, 1)
    cfg.parallel.dp_replicate, cfg.parallel.dp_shard = 1, 8
    assert shape(choose_layout(cfg, m, 8, 2, 4, CPU16)) == ("fsdp", 1, 8, 1)


def test_tensor_parallel_replicates_as_hsdp_with_dp_shard_1():
    cfg, m = nano()
    cfg.parallel.tp = 2
    assert shape(choose_layout(cfg, m, 4, 2, 2, CPU16)) == ("fsdp", 2, 1, 2)
    cfg.parallel.tp = 3
    with pytest.raises(UserError, match="not divisible"):
        choose_layout(cfg, m, 4, 2, 2, CPU16)


def test_train_auto_judges_the_smallest_micro_batch_it_can_pick():
    cfg, m = preset("medium", micro_batch=12)
    assert shape(choose_layout(cfg, m, 16, 2, 8, GPU24)) == ("fsdp", 2, 8, 1)
    cfg.train.auto = True  # micro-batch 1 with activation checkpointing fits replicated
    assert shape(choose_layout(cfg, m, 16, 2, 8, GPU24)) == ("ddp", 16, 1, 1)


def test_apply_auto_plans_memory_for_the_replicated_layout(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "1")
    cfg, m = nano(micro_batch=8, grad_accum=4)
    ac = auto.apply_auto(cfg, m, CPU16, world_size=2)
    assert ac.estimated_bytes == cost.estimate_memory(m, cfg.train.micro_batch, m.block_size, ac.precision,
                                                      activation_checkpointing=ac.activation_checkpointing,
                                                      world_size=2, shard=1, device="cpu")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # one node of 2: FSDP over both ranks, as before
    cfg, m = nano(micro_batch=8, grad_accum=4)
    ac = auto.apply_auto(cfg, m, CPU16, world_size=2)
    assert ac.estimated_bytes == cost.estimate_memory(m, cfg.train.micro_batch, m.block_size, ac.precision,
                                                      activation_checkpointing=ac.activation_checkpointing,
                                                      world_size=2, shard=2, device="cpu")


def test_layout_line_names_nodes_and_reason(capsys):
    cfg, m = nano()
    env = DistEnv(world_size=2, nnodes=2, ranks_per_node=1, mesh=object())  # a mesh: nothing to build
    lay = settle_layout(env, cfg, m, CPU16)
    assert env.layout is lay and shape(lay) == ("ddp", 2, 1, 1)
    line = capsys.readouterr().out.strip()
    assert line == describe(lay, env)
    assert line.startswith("parallel: ddp across 2 nodes x 1 rank, mesh dp_replicate 2 x dp_shard 1 x tp 1, "
                           "backend gloo: the model (est ")
    assert line.endswith("fits replicated; FSDP would send parameters over the inter-node link every step")
    assert settle_layout(env, cfg, m, CPU16) is lay and capsys.readouterr().out == ""  # once
    one = DistEnv(world_size=4, nnodes=1, ranks_per_node=4, device=torch.device("cuda", 0), mesh=object())
    cfg.parallel.tp = 2
    assert describe(choose_layout(cfg, m, 4, 1, 4, CPU16), one) == (
        "parallel: fsdp + tp on 4 rank(s), mesh dp_replicate 1 x dp_shard 2 x tp 2, backend nccl: "
        "one node: auto shards over its ranks")
    assert settle_layout(DistEnv(), cfg, m) is None  # one process, no process group


def test_resolve_strategy_needs_a_settled_layout_on_several_nodes():
    from gptforge.parallel.layout import resolve_strategy

    env = DistEnv(world_size=2, dp_size=2, nnodes=2)
    with pytest.raises(RuntimeError, match="settle_layout"):
        resolve_strategy(env, Config().parallel)
    env.layout = types.SimpleNamespace(strategy="ddp")
    assert resolve_strategy(env, Config().parallel) == "ddp"
