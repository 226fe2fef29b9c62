"""train.optimizer=muon: Muon's update against an independent Newton-Schulz reference (float64), which
parameter gets Muon and which AdamW (by name), per-group learning rates on the schedule, the non-finite step skipped
on the device, and an exact resume with Muon's state through the real `gptforge pretrain`."""

import dataclasses
import json
import math

import pytest
import torch

from conftest import read_losses, tiny_args
from gptforge.checkpoint import list_checkpoints
from gptforge.cli import main
from gptforge.config.loader import parse_config
from gptforge.config.schema import Config
from gptforge.errors import UserError
from gptforge.model.gpt import GPTConfig, build_model
from gptforge.train.optim import Muon, build_optimizer, muon_roles, newton_schulz, skip_on_device

COEFFS = (3.4445, -4.7750, 2.0315)
MUON = ["--train.optimizer=muon", "--train.muon_lr=0.02"]


# ---- the reference, written here from the algorithm (Keller Jordan's Muon post) -------------------------------
def ns_reference(g: torch.Tensor, steps: int, coeffs=COEFFS) -> torch.Tensor:
    """Quintic Newton-Schulz on g as it is (no transposition, no addmm): X <- a X + b X (X^T X) + c X (X^T X)^2
    after X = g / ||g||_F. The same polynomial in the singular values whichever side the Gram matrix is on."""
    a, b, c = coeffs
    x = g / g.norm()
    for _ in range(steps):
        s = x.T @ x
        x = a * x + b * (x @ s) + c * (x @ s @ s)
    return x


def muon_reference(w, grads, lr, momentum, wd, adjust):
    """Muon on one matrix over a list of gradients: Nesterov momentum, NS(5), decoupled decay, scaled lr."""
    w, buf = w.clone(), torch.zeros_like(w)
    rows, cols = w.shape
    scale = math.sqrt(max(1.0, rows / cols)) if adjust == "original" else 0.2 * math.sqrt(max(rows, cols))
    for g in grads:
        buf = momentum * buf + (1 - momentum) * g
        update = (1 - momentum) * g + momentum * buf  # g.lerp(buf, mu): Nesterov
        w = w * (1 - lr * wd) - lr * scale * ns_reference(update, 5)
    return w, buf


def test_reference_is_an_orthogonalisation():
    """The reference itself: with the cubic coefficients (1.5, -0.5, 0) and many steps it converges to U V^T."""
    g = torch.randn(6, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    torch.testing.assert_close(ns_reference(g, 60, (1.5, -0.5, 0.0)), u @ vh, rtol=0, atol=1e-10)
    # the quintic gives singular values spread around 1 (not exactly 1) after 5 steps
    sv = torch.linalg.svdvals(ns_reference(g, 5))
    assert 0.6 < sv.min() and sv.max() < 1.25, sv


@pytest.mark.parametrize("shape", [(8, 8), (12, 5), (5, 12)], ids=["square", "tall", "wide"])
def test_newton_schulz_equals_reference_float64(shape):
    g = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ours = newton_schulz(g, 5, COEFFS, 1e-7, torch.float64)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, ns_reference(g, 5), rtol=0, atol=1e-12)


def test_newton_schulz_in_bf16_is_torchs():
    """In bf16 (as on a GPU) ours is torch.optim.Muon's own iteration, bit for bit."""
    from torch.optim._muon import _zeropower_via_newtonschulz

    for shape in [(16, 16), (24, 8), (8, 24)]:
        g = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
        assert torch.equal(newton_schulz(g, 5, COEFFS, 1e-7, torch.bfloat16),
                           _zeropower_via_newtonschulz(g, COEFFS, 5, 1e-7))


@pytest.mark.parametrize("adjust", ["original", "match_rms_adamw"])
@pytest.mark.parametrize("shape", [(12, 5), (5, 12)], ids=["tall", "wide"])
def test_muon_step_equals_reference(adjust, shape):
    """Three steps of our Muon (float64, so the iteration runs in float64) against the reference."""
    gen = torch.Generator().manual_seed(3)
    w0 = torch.randn(*shape, dtype=torch.float64, generator=gen)
    grads = [torch.randn(*shape, dtype=torch.float64, generator=gen) for _ in range(3)]
    p = torch.nn.Parameter(w0.clone())
    opt = Muon([p], ns_dtype=torch.float32, lr=0.05, momentum=0.9, weight_decay=0.3, adjust_lr_fn=adjust)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    want_w, want_buf = muon_reference(w0, grads, 0.05, 0.9, 0.3, adjust)
    torch.testing.assert_close(p.detach(), want_w, rtol=0, atol=1e-12)
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], want_buf, rtol=0, atol=1e-12)


def test_muon_step_is_torchs_in_bf16():
    """Where torch.optim.Muon can run (a plain matrix, bf16 iteration) our step is its step, bit for bit."""
    gen = torch.Generator().manual_seed(4)
    a = torch.nn.Parameter(torch.randn(16, 8, generator=gen))
    b = torch.nn.Parameter(a.detach().clone())
    kw = dict(lr=0.02, momentum=0.95, weight_decay=0.1)
    ours, theirs = Muon([a], ns_dtype=torch.bfloat16, **kw), torch.optim.Muon([b], **kw)
    for _ in range(3):
        a.grad = torch.randn(16, 8, generator=gen)
        b.grad = a.grad.clone()
        ours.step()
        theirs.step()
    assert torch.equal(a, b)
    assert torch.equal(ours.state[a]["momentum_buffer"], theirs.state[b]["momentum_buffer"])


# ---- which parameter gets which -------------------------------------------------------------------------------
def tiny(arch="gpt2", tie=True, **kw) -> GPTConfig:
    return GPTConfig(arch=arch, vocab_size=64, block_size=16, n_layer=2, n_head=2, n_kv_head=1 if arch == "llama"
                     else None, d_model=16, d_ff=32, bias=arch == "gpt2", tie_embeddings=tie, **kw)


def block(i, arch):
    mats = ["attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.up_proj", "mlp.down_proj"]
    if arch == "llama":
        mats.append("mlp.gate_proj")
    out = {f"layers.{i}.{m}.weight": "muon" for m in mats}
    out |= {f"layers.{i}.{n}.weight": "scalar" for n in ("attn_norm", "mlp_norm")}
    if arch == "gpt2":  # biases and LayerNorm biases
        out |= {f"layers.{i}.{m}.bias": "scalar" for m in mats}
        out |= {f"layers.{i}.{n}.bias": "scalar" for n in ("attn_norm", "mlp_norm")}
    return out


@pytest.mark.parametrize("arch,tie", [("gpt2", True), ("gpt2", False), ("llama", True), ("llama", False)])
def test_roles_by_name(arch, tie):
    model = build_model(tiny(arch, tie))
    want = {"tok_emb.weight": "embed", "norm.weight": "scalar"} | block(0, arch) | block(1, arch)
    if arch == "gpt2":
        want |= {"pos_emb.weight": "embed", "norm.bias": "scalar"}
    if not tie:
        want["lm_head.weight"] = "head"  # tied: the head is tok_emb itself (embed_lr)
    assert muon_roles(model) == want

    tcfg = dataclasses.replace(Config().train, optimizer="muon", lr=1e-3, muon_lr=0.02, embed_lr=0.5, head_lr=0.25,
                               scalar_lr=0.125, weight_decay=0.1, muon_weight_decay=0.01)
    opt = build_optimizer(model, tcfg, torch.device("cpu"))
    named = dict(model.named_parameters())
    assert opt.roles == ["muon", "embed", "scalar"] if tie else ["muon", "embed", "head", "scalar"]
    for role, g in zip(opt.roles, opt.param_groups):
        assert {id(p) for p in g["params"]} == {id(named[n]) for n, r in want.items() if r == role}, role
    lrs = {"muon": 0.02, "embed": 0.5, "head": 0.25, "scalar": 0.125}
    decay = {"muon": 0.01, "embed": 0.1, "head": 0.1, "scalar": 0.0}
    assert opt.peak_lrs == [lrs[r] for r in opt.roles]
    assert [g["weight_decay"] for g in opt.param_groups] == [decay[r] for r in opt.roles]
    assert opt.muon.param_groups == opt.param_groups[:1] and opt.adamw.param_groups == opt.param_groups[1:]


def test_roles_see_through_wrappers():
    """DDP's "module.", activation checkpointing's and torch.compile's wrappers do not change the roles."""
    from gptforge.parallel.parallelize import apply_activation_checkpointing

    model = build_model(tiny("llama", False))
    want = muon_roles(model)
    apply_activation_checkpointing(model)
    model.layers.register_module("1", torch.compile(model.layers["1"]))
    names = [n for n, _ in model.named_parameters()]
    assert any("_checkpoint_wrapped_module." in n for n in names) and any("_orig_mod." in n for n in names)
    wrapper = torch.nn.Module()
    wrapper.module = model  # as DDP names it
    assert muon_roles(wrapper) == want


# ---- one optimizer to the trainer ------------------------------------------------------------------------------
def _stepped(finite: bool):
    model = build_model(tiny("gpt2", False))
    tcfg = dataclasses.replace(Config().train, optimizer="muon")
    opt = build_optimizer(model, tcfg, torch.device("cpu"))
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.01)
    skip_on_device(opt, torch.ones((), dtype=torch.bool))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.02 if finite else float("nan"))
    skip_on_device(opt, torch.tensor(finite))
    return model, opt, before, state


def test_non_finite_step_is_skipped_on_the_device():
    model, opt, before, state = _stepped(False)
    assert opt.honours_found_inf  # fused AdamW inside: the flag is not read by the host
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    for p, s in opt.state.items():
        for k, v in s.items():
            assert torch.equal(v, state[id(p)][k]), k
    model, opt, before, _ = _stepped(True)  # and a finite one moves every parameter
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_state_dict_round_trip_keeps_the_inner_optimizers_linked():
    model, opt, _, _ = _stepped(True)
    sd = opt.state_dict()
    assert len(sd["param_groups"]) == 4 and "ns_steps" in sd["param_groups"][0] and "betas" in sd["param_groups"][1]
    other = build_optimizer(model, dataclasses.replace(Config().train, optimizer="muon"), torch.device("cpu"))
    other.load_state_dict(sd)
    assert other.muon.state is other.state and other.adamw.state is other.state
    assert other.muon.param_groups[0] is other.param_groups[0] and other.adamw.param_groups[0] is other.param_groups[1]
    q = model.layers["0"].attn.q_proj.weight
    assert torch.equal(other.state[q]["momentum_buffer"], opt.state[q]["momentum_buffer"])


# ---- through gptforge pretrain ----------------------------------------------------------------------------------
def test_group_lrs_follow_the_schedule(tmp_path, char_data):
    lrs = ["--train.embed_lr=0.006", "--train.head_lr=0.0015", "--train.scalar_lr=0.001", "--train.muon_lr=0.02",
           "--train.schedule=cosine", "--train.min_lr_ratio=0.1"]  # not the preset's recipe (wsd to 0)
    assert main(["pretrain", *tiny_args(tmp_path, char_data, "--train.max_steps=12", "--train.log_every=1",
                                        "--train.warmup_steps=4", "--model.tie_embeddings=false", *MUON,
                                        *lrs)]) == 0
    rows = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if "train/lr" in r]
    assert len(rows) == 12
    peak = {"muon": 0.02, "embed": 0.006, "head": 0.0015, "scalar": 0.001}
    for r in rows:  # every group on train.lr's schedule (warmup, cosine), scaled to its own peak
        for role, value in peak.items():
            assert r[f"train/lr_{role}"] == pytest.approx(r["train/lr"] * value / 3e-3, rel=1e-12), (role, r)
    seen = [r["train/lr_muon"] for r in rows]
    assert seen[3] == pytest.approx(0.02) and seen[0] == pytest.approx(0.005) and seen[-1] < 0.2 * 0.02


def test_muon_resume_is_exact_and_learns(tmp_path, char_data):
    full, split = tmp_path / "full", tmp_path / "split"
    recipe = [*MUON, "--model.tie_embeddings=false", "--train.embed_lr=0.01", "--train.muon_weight_decay=0.05"]
    assert main(["pretrain", *tiny_args(full, char_data, "--train.max_steps=20", *recipe)]) == 0
    assert main(["pretrain", *tiny_args(split, char_data, "--train.max_steps=20", "--train.save_every=10",
                                        "--train.stop_after=10", *recipe)]) == 0
    ck = list_checkpoints(split)[-1]
    meta = (ck / ".metadata").read_bytes()
    assert b"layers.0.attn.q_proj.weight.momentum_buffer" in meta and b"lm_head.weight.exp_avg_sq" in meta
    assert main(["pretrain", *tiny_args(split, char_data, "--train.max_steps=20", "--train.resume=auto",
                                        *recipe)]) == 0
    a, b = read_losses(full), read_losses(split)
    assert len(a) == 20 and a == b  # bitwise
    assert a[-1] < a[0] - 1.0, a


def test_resume_with_another_optimizer_is_one_line(tmp_path, char_data, capsys):
    assert main(["pretrain", *tiny_args(tmp_path, char_data, "--train.max_steps=2", *MUON)]) == 0
    capsys.readouterr()
    args = tiny_args(tmp_path, char_data, "--train.max_steps=4", "--train.resume=auto", "--train.optimizer=adamw")
    assert main(["pretrain", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "train.optimizer=muon, not adamw" in err and "--train.optimizer=muon" in err


@pytest.mark.parametrize("flag,message", [
    ("--train.muon_lr=0", "'train.muon_lr' must be a positive number"),
    ("--train.muon_momentum=1", "'train.muon_momentum' must be in [0, 1)"),
    ("--train.muon_weight_decay=-0.1", "'train.muon_weight_decay' must be >= 0"),
    ("--train.muon_ns_steps=0", "'train.muon_ns_steps' must be in [1, 100)"),
    ("--train.head_lr=-1", "'train.head_lr' must be a positive number"),
])
def test_bad_muon_settings_are_one_line(flag, message):
    with pytest.raises(UserError) as e:
        parse_config(["--train.optimizer=muon", flag])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_help_names_the_keys(capsys):
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    out = capsys.readouterr().out
    for key in ("optimizer", "muon_lr", "muon_momentum", "muon_weight_decay", "muon_ns_steps", "muon_adjust_lr",
                "embed_lr", "head_lr", "scalar_lr"):
        assert f"--train.{key}" in out, key
