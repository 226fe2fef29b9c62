"""Pieces of gptforge.parallel that need no process group."""

from __future__ import annotations

import types

import pytest
import torch

from gptforge.errors import UserError
from gptforge.model.gpt import GPTConfig
from gptforge.parallel import exit as pexit
from gptforge.parallel.grad import clip_grad_norm_
from gptforge.parallel.layout import resolve_strategy
from gptforge.parallel.tp import check_tp


def test_tp_must_divide_kv_heads_with_a_clear_error():
    cfg = GPTConfig(arch="llama", n_head=8, n_kv_head=2, d_model=64, d_ff=128, block_size=32)
    check_tp(cfg, 2)
    with pytest.raises(UserError, match=r"parallel.tp=4 does not divide model.n_kv_head=2"):
        check_tp(cfg, 4)
    with pytest.raises(UserError, match="block_size=30"):
        check_tp(GPTConfig(n_head=4, d_model=64, d_ff=128, block_size=30), 4, sequence_parallel=True)


def test_ddp_with_tp_is_refused_and_auto_picks_fsdp():

    sizes = {"dp_shard": 1, "dp_replicate": 2}
    env = types.SimpleNamespace(dp_size=2, tp_size=2, layout=None,
                                mesh={k: types.SimpleNamespace(size=lambda v=v: v) for k, v in sizes.items()})
    with pytest.raises(UserError, match="strategy=ddp cannot be combined with tensor parallel"):
        resolve_strategy(env, types.SimpleNamespace(strategy="ddp"))
    assert resolve_strategy(env, types.SimpleNamespace(strategy="auto")) == "fsdp"
    env.tp_size = 1
    assert resolve_strategy(env, types.SimpleNamespace(strategy="auto")) == "ddp"


def test_clip_grad_norm_matches_torch_on_plain_tensors():
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(4))]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    for p, q in zip(a, b):
        g = torch.randn_like(p) * 3
        p.grad, q.grad = g.clone(), g.clone()
    n1 = clip_grad_norm_(a, 1.0)
    n2 = torch.nn.utils.clip_grad_norm_(b, 1.0)
    assert torch.allclose(n1, n2)
    for p, q in zip(a, b):
        assert torch.allclose(p.grad, q.grad)


def test_run_main_returns_normally_without_a_process_group():
    assert not pexit.distributed_used()
    assert pexit.run_main(lambda: 3) == 3
    assert pexit.run_main(lambda: None) == 0
    with pytest.raises(ValueError):
        pexit.run_main(lambda: (_ for _ in ()).throw(ValueError("x")))


def test_mesh_shape_errors_name_both_numbers():
    from gptforge.parallel.mesh import mesh_shape

    assert mesh_shape(8, 1, -1, 2) == (1, 4, 2)
    assert mesh_shape(16, 2, -1, 2) == (2, 4, 2)
    with pytest.raises(UserError, match=r"= 2\*2\*2 = 8 but the world size is 4"):
        mesh_shape(4, 2, 2, 2)
    with pytest.raises(UserError, match="world size 1 is not divisible .* = 2"):
        mesh_shape(1, 1, -1, 2)


def test_grad_compression_needs_ddp_over_two_ranks():
    from types import SimpleNamespace

    from gptforge.parallel.compress import check_compression

    cfg = SimpleNamespace(grad_compression="bf16", powersgd_rank=4, powersgd_start=10)
    check_compression(cfg, "ddp", 2, 1)
    with pytest.raises(UserError, match=r"^parallel.grad_compression=bf16 .* this run is fsdp \+ tp on 2 data-parallel"):
        check_compression(cfg, "fsdp", 2, 2)
    with pytest.raises(UserError, match="this run is a single data-parallel rank"):
        check_compression(cfg, "ddp", 1, 1)
    cfg.grad_compression, cfg.powersgd_start = "powersgd", 1
    with pytest.raises(UserError, match="powersgd_start >= 2 .* got 4 and 1"):
        check_compression(cfg, "ddp", 2, 1)
    cfg.grad_compression = "none"
    check_compression(cfg, "fsdp", 1, 2)  # nothing asked, nothing checked
