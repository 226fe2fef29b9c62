"""The block options (model.qk_norm, mlp_act, zero_init_proj, logit_softcap, untied head): each forward
against a hand-written reference in plain torch ops, the KV-cache and serve decode paths, the loss paths
with soft-capping, the cost model, and old configs (without the keys) building the old model."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gptforge.checkpoint import load_model, model_config, save_checkpoint, saved_model_config
from gptforge.config.loader import parse_config
from gptforge.errors import UserError
from gptforge.model import cost
from gptforge.model.engine import Engine, Params
from gptforge.model.gpt import GPT, GPTConfig, build_model
from gptforge.model.kv_cache import SlotCache
from gptforge.objectives import head as head_mod
from gptforge.objectives.head import linear_cross_entropy, resolve_loss_impl, token_loss
from gptforge.parallel.mesh import DistEnv
from support.decode_reference import recompute_decode

V = 96
NEW_KEYS = ("qk_norm", "mlp_act", "zero_init_proj", "logit_softcap")


def cfg_of(arch: str = "llama", **kw) -> GPTConfig:
    base = dict(arch=arch, vocab_size=V, block_size=24, n_layer=2, n_head=4, n_kv_head=2 if arch == "llama" else 4,
                d_model=32, d_ff=48, bias=arch == "gpt2", init_std=0.2, rope_theta=500.0)
    return GPTConfig(**(base | kw))


def model_of(cfg: GPTConfig, seed: int = 0, dtype=torch.float64):
    """A model with gains and biases away from 1 and 0, so a mix-up of them shows."""
    m = build_model(cfg, seed=seed).to(dtype).eval()
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=g, dtype=dtype) * 0.3)
    return m


# ---- the reference: the whole forward in plain torch ops, from the model's weights -------------
def reference_logits(m, idx: torch.Tensor) -> torch.Tensor:
    c = m.cfg
    W = {k: v.detach() for k, v in m.state_dict().items()}
    B, T = idx.shape
    hd, nh, nkv = c.d_model // c.n_head, c.n_head, c.n_kv_head or c.n_head
    eps = c.norm_eps

    def lin(x, name):
        y = x @ W[name + ".weight"].T
        return y + W[name + ".bias"] if (name + ".bias") in W else y

    def rms(x, gain):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * gain

    def norm(x, name):
        if c.arch == "llama":
            return rms(x, W[name + ".weight"])
        mu = x.mean(-1, keepdim=True)
        y = (x - mu) / torch.sqrt(((x - mu) ** 2).mean(-1, keepdim=True) + eps) * W[name + ".weight"]
        return y + W[name + ".bias"] if (name + ".bias") in W else y

    def rope(x):  # (B, H, T, hd): pairs (i, i + hd/2) rotated by angle t * theta^(-2i/hd), as complex numbers
        inv = 1.0 / (c.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        ang = torch.arange(T, dtype=torch.float32)[:, None] * inv[None, :]
        rot = torch.complex(ang.cos().double(), ang.sin().double())  # cos, sin in fp32, as the model's cache
        z = torch.complex(x[..., : hd // 2].double(), x[..., hd // 2:].double()) * rot
        return torch.cat([z.real, z.imag], -1).to(x.dtype)

    def mlp(x, p):
        u = lin(x, p + "up_proj")
        act = c.mlp_act if c.mlp_act != "auto" else ("swiglu" if c.arch == "llama" else "gelu")
        if act == "gelu":
            h = 0.5 * u * (1 + torch.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u ** 3)))
        elif act == "swiglu":
            g = lin(x, p + "gate_proj")
            h = g / (1 + torch.exp(-g)) * u
        else:  # relu2
            h = torch.where(u > 0, u, torch.zeros_like(u)) ** 2
        return lin(h, p + "down_proj")

    x = W["tok_emb.weight"][idx]
    if c.arch == "gpt2":
        x = x + W["pos_emb.weight"][:T]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(c.n_layer):
        p = f"layers.{i}."
        a = norm(x, p + "attn_norm")
        q = lin(a, p + "attn.q_proj").view(B, T, nh, hd)
        k = lin(a, p + "attn.k_proj").view(B, T, nkv, hd)
        v = lin(a, p + "attn.v_proj").view(B, T, nkv, hd)
        if c.qk_norm:
            q, k = rms(q, W[p + "attn.q_norm.weight"]), rms(k, W[p + "attn.k_norm.weight"])
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if c.arch == "llama":
            q, k = rope(q), rope(k)
        k, v = k.repeat_interleave(nh // nkv, 1), v.repeat_interleave(nh // nkv, 1)
        s = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        s = s.masked_fill(~causal, float("-inf"))
        y = (torch.softmax(s, -1) @ v).transpose(1, 2).reshape(B, T, nh * hd)
        x = x + lin(y, p + "attn.o_proj")
        x = x + mlp(norm(x, p + "mlp_norm"), p + "mlp.")
    logits = norm(x, "norm") @ W["lm_head.weight"].T
    if c.logit_softcap:
        logits = c.logit_softcap * torch.tanh(logits / c.logit_softcap)
    return logits


OPTIONS = {
    "plain": {},
    "qk_norm": {"qk_norm": True},
    "relu2": {"mlp_act": "relu2"},
    "gelu": {"mlp_act": "gelu"},
    "swiglu": {"mlp_act": "swiglu"},
    "zero_init": {"zero_init_proj": True},
    "untied": {"tie_embeddings": False},
    "softcap": {"logit_softcap": 2.0},
    "all": {"qk_norm": True, "mlp_act": "relu2", "zero_init_proj": True, "tie_embeddings": False,
            "logit_softcap": 2.0},
}


def idx_of(B=2, T=20, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("opt", list(OPTIONS))
def test_forward_equals_reference(arch, opt):
    m = model_of(cfg_of(arch, **OPTIONS[opt]))
    if opt in ("zero_init", "all"):  # else the zero projections hide the blocks from the comparison
        with torch.no_grad():
            for n, p in m.named_parameters():
                if n.endswith(("o_proj.weight", "down_proj.weight")):
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n)),
                                        dtype=p.dtype) * 0.1)
    x = idx_of()
    with torch.no_grad():
        got, want = m(x), reference_logits(m, x)
    assert want.std() > 0.5  # logits of a useful size: the tolerance below means something
    assert (got - want).abs().max().item() < 1e-9
    if "logit_softcap" in OPTIONS[opt]:
        assert want.abs().max() < 2.0 and want.abs().max() > 1.5  # the cap is active
    if opt == "qk_norm":  # the q/k gains really enter: changing one changes the logits
        with torch.no_grad():
            m.layers["0"].attn.k_norm.weight.mul_(1.5)
            assert (m(x) - want).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_fp32_forward_equals_reference(arch):
    m = model_of(cfg_of(arch, **(OPTIONS["all"] | {"zero_init_proj": False})), dtype=torch.float32)
    x = idx_of()
    with torch.no_grad():
        ref = reference_logits(m.double(), x)
        got = m.float()(x)
    assert (got.double() - ref).abs().max().item() < 1e-5


def test_module_names_and_parameter_counts():
    m = build_model(cfg_of("llama", qk_norm=True, mlp_act="relu2"))
    names = {n for n, _ in m.named_parameters()}
    assert {"layers.0.attn.q_norm.weight", "layers.0.attn.k_norm.weight"} <= names
    assert not any("gate_proj" in n for n in names)
    assert m.layers["0"].attn.q_norm.weight.shape == (8,)  # per head_dim, shared by the heads
    g = build_model(cfg_of("gpt2", mlp_act="swiglu"))
    assert any("gate_proj" in n for n, _ in g.named_parameters())


# ---- initialisation ---------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_zero_init_and_options_keep_the_random_stream(arch):
    base = dict(build_model(cfg_of(arch), seed=4).named_parameters())
    z = build_model(cfg_of(arch, zero_init_proj=True, qk_norm=True, mlp_act="relu2" if arch == "gpt2" else "auto"),
                    seed=4)
    for n, p in z.named_parameters():
        if n.endswith(("o_proj.weight", "down_proj.weight")):
            assert torch.count_nonzero(p) == 0, n
        elif "q_norm" in n or "k_norm" in n:
            assert torch.equal(p, torch.ones_like(p)), n
        else:
            assert torch.equal(p, base[n]), n
    # at init every block is the identity on the residual stream, yet the zero projections still learn
    x = idx_of(1, 8)
    h = z.tok_emb(x) + (z.pos_emb(torch.arange(8)) if arch == "gpt2" else 0)
    for layer in z.layers.values():
        rope = None if arch == "gpt2" else (z.rope_cos[:8], z.rope_sin[:8])
        assert torch.equal(layer(h, rope), h)
    F.cross_entropy(z(x).flatten(0, 1), idx_of(1, 8, seed=2).flatten()).backward()
    assert z.layers["1"].attn.o_proj.weight.grad.abs().sum() > 0
    assert z.layers["1"].mlp.down_proj.weight.grad.abs().sum() > 0


# ---- incremental decoding ---------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_kv_cache_decode_equals_full_forward_with_qk_norm(arch):
    m = model_of(cfg_of(arch, qk_norm=True, mlp_act="relu2", logit_softcap=2.0, tie_embeddings=False))
    x = idx_of(2, 14)
    with torch.no_grad():
        full = m(x)
        cache = SlotCache(m, slots=2)

        def feed(chunk):
            pos, mask = cache.select([0, 1], chunk.shape[1])
            return m(chunk, kv_cache=cache, attn_mask=mask, positions=pos)

        steps = [feed(x[:, :6])] + [feed(x[:, t:t + 1]) for t in range(6, 14)]
    assert (torch.cat(steps, 1) - full).abs().max().item() < 1e-9


def test_serve_slot_cache_decode_equals_full_forward_with_qk_norm():
    """The engine's call: model(x, kv_cache=SlotCache, attn_mask, positions (B, T)), two rows of different
    lengths decoded together, as the serve scheduler does."""
    m = model_of(cfg_of("llama", qk_norm=True, tie_embeddings=False))
    a, b = idx_of(1, 11, seed=5)[0].tolist(), idx_of(1, 6, seed=6)[0].tolist()
    cache = SlotCache(m, slots=3)
    got = {0: [], 2: []}
    with torch.no_grad():
        for row, seq in ((0, a[:7]), (2, b[:3])):  # prefill each row on its own
            pos, mask = cache.select([row], len(seq))
            got[row].append(m(torch.tensor([seq]), kv_cache=cache, attn_mask=mask, positions=pos)[0])
        for t in range(3):  # then decode both rows together
            pos, mask = cache.select([0, 2], 1)
            out = m(torch.tensor([[a[7 + t]], [b[3 + t]]]), kv_cache=cache, attn_mask=mask, positions=pos)
            got[0].append(out[0])
            got[2].append(out[1])
        for row, seq in ((0, a[:10]), (2, b[:6])):
            full = m(torch.tensor([seq]))[0]
            assert (torch.cat(got[row]) - full).abs().max().item() < 1e-9, row


def test_greedy_generation_with_and_without_cache_agree():
    m = model_of(cfg_of("llama", qk_norm=True, mlp_act="relu2"), dtype=torch.float32)
    prompt = idx_of(1, 5)[0].tolist()
    cached = Engine(m, None).run(prompt, Params(12, 0.0)).ids
    plain = Engine(m, None, use_cache=False).run(prompt, Params(12, 0.0)).ids
    assert cached == plain == recompute_decode(m, prompt, 12) and len(cached) == 12


# ---- soft-capping on every loss path ----------------------------------------------------------
def _softcapped_ce(h, w, y, c, reduction="mean"):
    z = h @ w.T
    z = z if z.dtype == torch.float64 else z.float()
    return F.cross_entropy(c * torch.tanh(z / c), y, ignore_index=-100, reduction=reduction)


@pytest.mark.parametrize("impl", ["plain", "chunked"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_softcap_loss_and_gradients_equal_the_reference(impl, reduction, dtype):
    """linear_cross_entropy with softcap (torch's fp32 op has none: our chunked autograd function, with its
    own gradient formula, and the checkpointed chunks take it) equals CE of the soft-capped logits, value
    and gradients. bf16 (autocast): the same loss; gradients within bf16 rounding (as without a cap)."""
    g = torch.Generator().manual_seed(0)
    N, D, Vw, c = 37, 16, 70, 3.0
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    h0 = torch.randn(N, D, generator=g, dtype=wide) * 2
    w0 = torch.randn(Vw, D, generator=g, dtype=wide)
    y = torch.randint(0, Vw, (N,), generator=g)
    y[::5] = -100
    runs = []
    for mine in (True, False):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            if mine:
                loss = linear_cross_entropy(h, w, y, impl, reduction, chunk_rows=8, softcap=c)
            else:
                loss = _softcapped_ce(h.to(dtype), w.to(dtype), y, c, reduction)
        (loss.sum() if reduction == "none" else loss).backward()
        runs.append((loss.detach(), h.grad, w.grad))
    (l1, gh1, gw1), (l2, gh2, gw2) = runs
    assert l1.dtype == l2.dtype == wide
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-5}[dtype]
    assert torch.allclose(l1, l2, rtol=tol, atol=tol), (l1, l2)
    assert (l2 - _softcapped_ce(h0, w0, y, 1e9, reduction)).abs().max() > 0.1  # the cap changes the loss
    gtol = 1e-2 if dtype == torch.bfloat16 else tol  # relative to the largest gradient
    for a, b in ((gh1, gh2), (gw1, gw2)):
        assert (a - b).abs().max() <= gtol * b.abs().max(), ((a - b).abs().max(), b.abs().max())


@pytest.mark.parametrize("impl", ["plain", "chunked"])
def test_softcap_through_the_model_head(impl):
    """token_loss(head=...) on a soft-capped model equals CE of its (soft-capped) logits, for each loss_impl."""
    m = model_of(cfg_of("llama", logit_softcap=2.0, tie_embeddings=False), dtype=torch.float32)
    x, y = idx_of(2, 20), idx_of(2, 20, seed=3)
    batch = {"input_ids": x, "labels": y}
    want = F.cross_entropy(reference_logits(m.double(), x).flatten(0, 1), y.flatten()).item()
    m.float()
    got = token_loss(m, batch, impl, chunk_rows=8)
    assert abs(got.item() - want) < 1e-5
    assert abs(F.cross_entropy(m.lm_head(m.norm(m.tok_emb(x))).flatten(0, 1), y.flatten()).item() - want) > 1e-3
    none = token_loss(m, batch, impl, "none", chunk_rows=8)  # DPO's per-token path
    assert abs(none.mean().item() - want) < 1e-5


def test_loss_impl_with_softcap(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_loss_impl("auto", cpu, 50304, 384, softcap=30.0)[0] == "chunked"
    monkeypatch.setattr(head_mod, "_liger_loss_cls", lambda: object)  # "installed": only the choice is tested
    assert resolve_loss_impl("auto", cuda, 50304, 384)[0] == "liger"
    impl, why = resolve_loss_impl("auto", cuda, 50304, 384, softcap=30.0)
    assert impl == "chunked" and "model.logit_softcap=30" in why
    impl, why = resolve_loss_impl("liger", cuda, 50304, 384, softcap=30.0)
    assert impl == "chunked" and "model.logit_softcap=30" in why


# ---- cost model -------------------------------------------------------------------------------
@pytest.mark.parametrize("opt", ["qk_norm", "relu2", "gelu", "swiglu", "all"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_param_count_with_options(arch, opt):
    c = cfg_of(arch, **OPTIONS[opt]).complete()
    with torch.device("meta"):
        m = GPT(c)
    assert cost.count_params(c) == m.num_params() == sum(p.numel() for p in m.parameters())


def test_flops_of_relu2_mlp():
    """6 x matmul parameters: a ReLU^2 MLP has two matrices (as GELU), SwiGLU three."""
    L, d, f, T, Vv = 2, 32, 48, 24, V
    for arch in ("gpt2", "llama"):
        c = cfg_of(arch, mlp_act="relu2", bias=False).complete()
        kv = c.head_dim * c.n_kv_head
        norms = 2 * d  # two gains a block (no bias: LayerNorm has only a gain too), counted as cost.py does
        want = 6 * (L * (d * (d + 2 * kv) + d * d + 2 * d * f + norms) + Vv * d) + 12 * L * d * T
        assert cost.flops_per_token(c) == want
        swiglu = cfg_of(arch, mlp_act="swiglu", bias=False).complete()
        assert cost.flops_per_token(swiglu) - cost.flops_per_token(c) == 6 * L * d * f
        assert cost.flops_per_token(cfg_of(arch, mlp_act="relu2", bias=False, qk_norm=True).complete()) == \
            want + 6 * L * 2 * c.head_dim


# ---- config keys ------------------------------------------------------------------------------
def test_validate_names_the_key():
    for kw, key in (({"qk_norm": "yes"}, "model.qk_norm"), ({"zero_init_proj": 1}, "model.zero_init_proj"),
                    ({"mlp_act": "silu"}, "model.mlp_act"), ({"logit_softcap": -1.0}, "model.logit_softcap"),
                    ({"logit_softcap": float("inf")}, "model.logit_softcap"),
                    ({"logit_softcap": True}, "model.logit_softcap"), ({"logit_softcap": "30"}, "model.logit_softcap")):
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            cfg_of("llama", **kw).validate()
    cfg_of("llama", logit_softcap=30, mlp_act="relu2").validate()  # an int cap is fine


def test_command_line_keys():
    cfg = parse_config(["--model.qk_norm=true", "--model.mlp_act=relu2", "--model.zero_init_proj=true",
                        "--model.logit_softcap=30", "--model.tie_embeddings=false"])
    m = cfg.model
    assert (m.qk_norm, m.mlp_act, m.zero_init_proj, m.logit_softcap, m.tie_embeddings) == (True, "relu2", True,
                                                                                              30.0, False)
    assert GPTConfig().qk_norm is False  # the key's own default is the old block (old checkpoints)
    assert parse_config(["--model.preset=minimind"]).model.qk_norm is False
    with pytest.raises((UserError, SystemExit)):
        parse_config(["--model.logit_softcap=-2"])


# ---- old checkpoints --------------------------------------------------------------------------
OLD_PARAMS = {  # parameter names of one block before the options existed
    "gpt2": {f"{m}.{k}" for m in ("attn_norm", "mlp_norm", "attn.q_proj", "attn.k_proj", "attn.v_proj",
                                  "attn.o_proj", "mlp.up_proj", "mlp.down_proj") for k in ("weight", "bias")},
    "llama": {"attn_norm.weight", "mlp_norm.weight"} | {f"{m}.weight" for m in (
        "attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")},
}


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_old_config_without_the_keys_builds_the_old_model(tmp_path, arch):
    cfg = cfg_of(arch).complete()
    old = {k: v for k, v in cfg.to_dict().items() if k not in NEW_KEYS}
    c = GPTConfig(**old)
    assert (c.qk_norm, c.mlp_act, c.zero_init_proj, c.logit_softcap) == (False, "auto", False, 0.0)
    assert c.activation == ("swiglu" if arch == "llama" else "gelu")
    m = model_of(c)
    block = {n.removeprefix("layers.0.") for n, _ in m.named_parameters() if n.startswith("layers.0.")}
    assert block == OLD_PARAMS[arch]
    x = idx_of()
    with torch.no_grad():
        assert (m(x) - reference_logits(m, x)).abs().max().item() < 1e-9

    # a checkpoint whose model_config.json predates the keys: loads, and resumes against today's config
    m = build_model(c, seed=2)
    with tempfile.TemporaryDirectory() as d:
        files = {"model_config.json": json.dumps(old)}
        ck = save_checkpoint(Path(d) / "run", 3, m, None, {"step": 3}, DistEnv(), files)
        assert not set(NEW_KEYS) & set(json.loads((ck / "model_config.json").read_text()))
        assert model_config(ck) == cfg
        back = load_model(ck, "cpu")
        with torch.no_grad():
            assert torch.equal(back(x), m(x))
        saved = saved_model_config(ck, DistEnv())
        now = cfg.to_dict()
        assert [k for k in now if saved.get(k) != now[k]] == []  # the trainer's resume comparison
