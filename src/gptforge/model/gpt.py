"""One GPT module for one device: GPT-2 style (learned positions, LayerNorm, GELU) and Llama style
(RoPE, RMSNorm, SwiGLU, grouped-query attention) chosen by config, plus the block options of recent
recipes (modded-nanogpt, Qwen3, Gemma 2): QK-norm, ReLU^2 MLP, zero-initialised output projections, an
untied head, logit soft-capping. No distributed code in here: parallelism is applied from outside
(gptforge.parallel). Build on the meta device, then init_weights()."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptforge.model.doc_mask import document_mask, flex_attention, is_block_mask


@dataclass
class GPTConfig:
    """The model: GPT-2 style or Llama style, its shape and initialisation."""

    preset: str = ""
    """named size (micro, nano, minimind, tiny, small, medium, large, llama-1b): applied before the other keys"""
    arch: Literal["gpt2", "llama"] = "gpt2"
    """gpt2: learned positions, LayerNorm, GELU; llama: RoPE, RMSNorm, SwiGLU, grouped-query attention"""
    vocab_size: Optional[int] = None
    """None: the tokenizer's vocab rounded up to a multiple of 64"""
    block_size: int = 1024
    """context length in tokens"""
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: Optional[int] = None
    """key/value heads, < n_head for grouped-query attention; None: n_head"""
    d_model: int = 768
    d_ff: int = 3072
    """hidden size of the MLP"""
    dropout: float = 0.0
    bias: bool = True
    tie_embeddings: bool = True
    """true: the output head is the token embedding; false: a separate (untied) head"""
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    init_std: float = 0.02
    qk_norm: bool = False
    """RMSNorm (a learned gain per head_dim) on each head's query and key, before RoPE (Qwen3's layout)"""
    mlp_act: Literal["auto", "gelu", "swiglu", "relu2"] = "auto"
    """MLP: gelu (tanh GELU, up/down), swiglu (SiLU-gated, gate/up/down), relu2 (relu(x)^2, up/down);
    auto: gelu for arch gpt2, swiglu for arch llama"""
    zero_init_proj: bool = False
    """initialise the attention output and MLP down projections (o_proj, down_proj) to zero"""
    logit_softcap: float = 0.0
    """0: off; c > 0: logits = c * tanh(logits / c), computed in fp32 (e.g. 30, as Gemma 2; 15 in modded-nanogpt)"""

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def activation(self) -> str:
        """mlp_act with auto resolved: gelu (arch gpt2) or swiglu (arch llama)."""
        if self.mlp_act == "auto":
            return "swiglu" if self.arch == "llama" else "gelu"
        return self.mlp_act

    def validate(self) -> "GPTConfig":
        """Range checks of every shape key (vocab_size may still be None); ValueError names the key to fix.
        Run on the command line's config and, through complete(), on every config a model is built from."""
        for key in ("n_layer", "n_head", "d_model", "d_ff", "block_size"):
            v = getattr(self, key)
            if type(v) is not int or v < 1:
                raise ValueError(f"model.{key} must be a positive integer, got {v!r}")
        if self.vocab_size is not None and (type(self.vocab_size) is not int or self.vocab_size < 1):
            raise ValueError(f"model.vocab_size must be a positive number (or unset: the tokenizer's), "
                             f"got {self.vocab_size}")
        if self.arch not in ("gpt2", "llama"):
            raise ValueError(f"model.arch must be 'gpt2' or 'llama', got {self.arch!r}")
        if self.d_model % self.n_head:
            raise ValueError(f"model.d_model={self.d_model} must be divisible by model.n_head={self.n_head}")
        if self.n_kv_head is not None and (type(self.n_kv_head) is not int or self.n_kv_head < 1
                                           or self.n_head % self.n_kv_head):
            raise ValueError(f"model.n_head={self.n_head} must be divisible by model.n_kv_head={self.n_kv_head}")
        if self.arch == "llama" and self.head_dim % 2:
            raise ValueError(f"model.d_model / model.n_head = {self.head_dim} must be even for RoPE (arch llama)")
        if type(self.dropout) not in (int, float) or not 0 <= self.dropout < 1:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")
        for key in ("norm_eps", "rope_theta", "init_std"):
            v = getattr(self, key)
            if type(v) not in (int, float) or not (v > 0 and math.isfinite(v)):
                raise ValueError(f"model.{key} must be a positive number, got {v!r}")
        for key in ("bias", "tie_embeddings", "qk_norm", "zero_init_proj"):  # model_config.json may hold anything
            if type(getattr(self, key)) is not bool:
                raise ValueError(f"model.{key} must be true or false, got {getattr(self, key)!r}")
        if self.mlp_act not in MLP_ACTS:
            raise ValueError(f"model.mlp_act must be one of {', '.join(MLP_ACTS)}, got {self.mlp_act!r}")
        c = self.logit_softcap
        if type(c) not in (int, float) or not (c >= 0 and math.isfinite(c)):
            raise ValueError(f"model.logit_softcap must be 0 (off) or a positive number such as 30, got {c!r}")
        return self

    def complete(self) -> "GPTConfig":
        """A checked copy with n_kv_head filled in; ValueError names the key to fix."""
        self.validate()
        if self.vocab_size is None:
            raise ValueError("model.vocab_size must be a positive number, got None")
        return replace(self, n_kv_head=self.kv_heads)

    def to_dict(self) -> dict:
        return asdict(self)


MLP_ACTS = ("auto", "gelu", "swiglu", "relu2")


def soft_cap(logits: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(logits / cap) in at least fp32 (the one soft-capping: the model and objectives/head.py)."""
    x = logits if logits.dtype == torch.float64 else logits.float()
    return torch.tanh(x / cap) * cap


class _RMSNormFn(torch.autograd.Function):
    """x * rsqrt(mean(x^2) + eps) * weight, computed in fp32, returned in `out_dtype`. Autograd keeps x (in its own
    dtype) and rstd only; torch's CPU rms_norm is a composite that keeps x and x * rstd in fp32: 4x the bytes for
    bf16 q and k under autocast (model.qk_norm), 2x for the fp32 residual stream."""

    @staticmethod
    def forward(ctx, x, weight, eps: float, out_dtype: torch.dtype):
        acc = torch.promote_types(x.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
        xf = x.to(acc)
        rstd = torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return (xf * rstd * weight.to(acc)).to(out_dtype)

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        acc = rstd.dtype
        xhat, g = x.to(acc) * rstd, dy.to(acc) * weight.to(acc)
        dx = rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))
        dw = (dy.to(acc) * xhat).flatten(0, -2).sum(0) if ctx.needs_input_grad[1] else None
        return dx.to(x.dtype), None if dw is None else dw.to(weight.dtype), None, None


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    t = x.device.type
    return torch.get_autocast_dtype(t) if torch.is_autocast_enabled(t) else None


class RMSNorm(nn.RMSNorm):
    """RMSNorm whose output is cast once to the autocast dtype (bf16/fp16) when autocast is on: the q, k, v (or
    up and gate) projections then share one low-precision copy instead of each keeping its own cast. On a CPU
    (plain tensors) through _RMSNormFn; elsewhere (CUDA's fused kernel, DTensors under TP) torch's rms_norm."""

    cast_output = True  # HeadNorm: the output keeps the input's dtype (q and k are already bf16 there)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = (_autocast_dtype(x) if self.cast_output else None) or x.dtype
        if x.device.type == "cpu" and type(x) is torch.Tensor and type(self.weight.data) is torch.Tensor:
            return _RMSNormFn.apply(x, self.weight, self.eps or torch.finfo(torch.float32).eps, out)
        w = self.weight.to(x.dtype) if not self.cast_output else self.weight
        return F.rms_norm(x, self.normalized_shape, w, self.eps).to(out)


class LayerNorm(nn.LayerNorm):
    """LayerNorm with its output cast once to the autocast dtype (as RMSNorm above)."""

    cast_output = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        out = _autocast_dtype(x) if self.cast_output else None
        return y.to(out) if out is not None else y


def _norm(cfg: GPTConfig) -> nn.Module:
    if cfg.arch == "llama":
        return RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


class HeadNorm(RMSNorm):
    """RMSNorm over head_dim (model.qk_norm); the output keeps q's / k's dtype (bf16 under autocast). Off the CPU
    its gain is cast to the input's dtype: an fp32 gain would send torch.rms_norm down its slow unfused path."""

    cast_output = False


def rope_cache(cfg: GPTConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (block_size, head_dim // 2), in float32."""
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, device=device, dtype=torch.float32) / cfg.head_dim))
    t = torch.arange(cfg.block_size, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv)
    return freqs.cos(), freqs.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, D); rotate-half convention (as Hugging Face Llama)."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_head * cfg.head_dim, bias=cfg.bias)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=cfg.bias)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=cfg.bias)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=cfg.bias)
        if cfg.qk_norm:  # one gain per head_dim, shared by the heads (replicated under tensor parallel)
            self.q_norm = HeadNorm(cfg.head_dim, eps=cfg.norm_eps)
            self.k_norm = HeadNorm(cfg.head_dim, eps=cfg.norm_eps)
        self.qk_norm = cfg.qk_norm
        self.dropout = cfg.dropout

    def forward(self, x, rope=None, kv_cache=None, layer_idx: int = 0, attn_mask=None):
        B, T, _ = x.shape
        # -1 rather than n_head: under tensor parallel each rank holds a slice of the heads.
        q = self.q_proj(x).view(B, T, -1, self.head_dim)
        k = self.k_proj(x).view(B, T, -1, self.head_dim)
        if self.qk_norm:  # per head, before RoPE; the KV cache stores the normalised keys
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if kv_cache is not None:
            k, v = kv_cache.update(layer_idx, k, v)
        groups = q.shape[1] // k.shape[1]
        if is_block_mask(attn_mask):  # packed documents through FlexAttention (model/doc_mask.py)
            return self.o_proj(flex_attention(q, k, v, attn_mask).transpose(1, 2).reshape(B, T, -1))
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        drop = self.dropout if self.training else 0.0
        if attn_mask is not None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=drop)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, dropout_p=drop)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.act = cfg.activation
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        if self.act == "swiglu":
            self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)

    def forward(self, x):
        if self.act == "swiglu":
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        if self.act == "relu2":
            return self.down_proj(F.relu(self.up_proj(x)).square())
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.attn_norm = _norm(cfg)
        self.attn = Attention(cfg)
        self.mlp_norm = _norm(cfg)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, rope=None, kv_cache=None, layer_idx: int = 0, attn_mask=None):
        x = x + self.drop(self.attn(self.attn_norm(x), rope, kv_cache, layer_idx, attn_mask))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


class GPT(nn.Module):
    attention = "sdpa"
    """how doc_ids become a mask: sdpa (dense bool mask) or flex (FlexAttention BlockMask); see model/doc_mask.py"""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg = cfg.complete()
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.d_model) if cfg.arch == "gpt2" else None
        self.drop = nn.Dropout(cfg.dropout)
        # a ModuleDict keyed "0".."n-1" keeps FQNs stable when layers are wrapped or sharded
        self.layers = nn.ModuleDict({str(i): Block(cfg) for i in range(cfg.n_layer)})
        self.norm = _norm(cfg)
        self.norm.cast_output = False  # the head's input stays fp32 (objectives/head.py casts it per chunk)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        if cfg.arch == "llama":
            cos, sin = rope_cache(cfg, device=self.tok_emb.weight.device)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)

    # ---- initialisation -------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, seed: int | None = None, device: torch.device | str | None = None) -> "GPT":
        """Materialise (from meta) on `device` and initialise like GPT-2: N(0, 0.02), residual
        projections scaled by 1/sqrt(2 * n_layer) (zero with zero_init_proj), zero biases, unit norms.
        The random stream is the same with and without the options: only the options' tensors differ."""
        if device is not None:
            self.to_empty(device=device)
            if self.cfg.tie_embeddings:  # to_empty unties parameters
                self.lm_head.weight = self.tok_emb.weight
        gen = torch.Generator(device="cpu")
        gen.manual_seed(0 if seed is None else seed)
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                s = std
                if name.endswith(("o_proj.weight", "down_proj.weight")):  # drawn either way: same stream
                    s = 0.0 if self.cfg.zero_init_proj else std / math.sqrt(2 * self.cfg.n_layer)
                p.copy_(torch.randn(p.shape, generator=gen) * s)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)
        if self.cfg.arch == "llama":
            cos, sin = rope_cache(self.cfg, device=self.tok_emb.weight.device)
            self.rope_cos, self.rope_sin = cos, sin
        return self

    # ---- forward --------------------------------------------------------------------------------
    def forward(self, idx: torch.Tensor, kv_cache=None, attn_mask=None, positions=None, doc_ids=None, head=None):
        """idx: (B, T) token ids -> logits (B, T, vocab). With kv_cache (model.kv_cache.SlotCache), idx holds only
        the new tokens, and positions and attn_mask are the ones kv_cache.select(rows, T) returned.
        attn_mask (optional, bool (B, 1, T, T)) overrides the causal mask; doc_ids (optional, (B, T)) instead
        mask by document, causal within each (packing; as self.attention says: dense mask or FlexAttention);
        positions (optional, (T,) or (B, T)) overrides 0..T-1 (restarts per packed document).
        head (optional): returns head(final hidden states (B, T, D) after the norm, lm_head.weight) in place
        of the logits: a loss that never holds all logits (objectives/head.py). It runs inside forward,
        where FSDP2 holds lm_head's unsharded weight. With model.logit_softcap > 0 the head is called with
        softcap=c too (it must soft-cap its logits: soft_cap), and the logits returned are soft-capped fp32."""
        B, T = idx.shape
        if kv_cache is not None and (attn_mask is None or positions is None):
            raise ValueError("a kv_cache needs the positions and attn_mask of kv_cache.select(rows, T)")
        start = kv_cache.length if kv_cache is not None else 0
        if start + T > self.cfg.block_size:
            raise ValueError(f"sequence of {start + T} tokens is longer than the context ({self.cfg.block_size})")
        if positions is None:
            positions = torch.arange(start, start + T, device=idx.device)
        x = self.tok_emb(idx)
        rope = None
        if self.pos_emb is not None:
            x = x + self.pos_emb(positions)
        else:
            rope = (self.rope_cos[positions], self.rope_sin[positions])
            if rope[0].dim() == 3:  # per-batch positions -> (B, 1, T, D/2)
                rope = (rope[0].unsqueeze(1), rope[1].unsqueeze(1))
        x = self.drop(x)
        if doc_ids is not None:  # built once, shared by every layer
            attn_mask = document_mask(doc_ids, self.attention)
        for i, layer in enumerate(self.layers.values()):
            x = layer(x, rope, kv_cache, i, attn_mask)
        if kv_cache is not None:
            kv_cache.advance(T)
        cap = self.cfg.logit_softcap
        if head is not None:
            return head(self.norm(x), self.lm_head.weight, **({"softcap": cap} if cap else {}))
        logits = self.lm_head(self.norm(x))
        return soft_cap(logits, cap) if cap else logits

    # ---- bookkeeping ----------------------------------------------------------------------------
    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # tied weights are counted once
        if non_embedding:
            n -= self.tok_emb.weight.numel()
            if self.pos_emb is not None:
                n -= self.pos_emb.weight.numel()
        return n


def build_model(cfg: GPTConfig, device: str | torch.device = "cpu", seed: int = 0) -> GPT:
    """Build on meta (no memory), then materialise and initialise on `device`. On a CPU the modules are built
    where they live: torch's own initialisers run on meta tensors through its Python references, which import
    torch._dynamo (~80 MB resident; inference on a CPU never needs it, training imports it anyway with any
    torch optimizer); init_weights() then overwrites every parameter the same way (one random stream), so the
    weights are identical either way."""
    if torch.device(device).type == "cpu":
        return GPT(cfg).init_weights(seed=seed)
    with torch.device("meta"):
        model = GPT(cfg)
    return model.init_weights(seed=seed, device=device)
