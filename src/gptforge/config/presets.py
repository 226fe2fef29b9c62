"""Named model sizes, resolved into a GPTConfig by one function: preset_model()."""

from __future__ import annotations

import dataclasses
import difflib

from gptforge.errors import UserError
from gptforge.model.gpt import GPTConfig

# Shapes (litgpt-style dicts). n_kv_head absent: it follows n_head. The vocabulary is the tokenizer's
# (rounded up to a multiple of 64) unless model.vocab_size is set; NOMINAL_VOCAB is the one each size is
# usually trained with, for estimates made before a tokenizer is known (doctor, cost tables).
#
# The block of the sizes trained from scratch here (micro to large) is Qwen3's layout: RoPE, RMSNorm, SwiGLU
# (d_ff ~ 8/3 d_model, a multiple of 64: the parameters of GPT-2's 4 d_model GELU MLP), QK-norm, no biases,
# tied embeddings; it exports to Hugging Face as Qwen3ForCausalLM. Measured against GPT-2's block at the
# same width, depth and parameters (README "Time to quality"). GPT-2's block:
# `--model.arch=gpt2 --model.qk_norm=false --model.bias=true --model.d_ff=<4 x d_model>`.
_MODERN = dict(arch="llama", qk_norm=True, bias=False, norm_eps=1e-5, rope_theta=10000.0)
MODEL_PRESETS: dict[str, dict] = {
    # ~3.3M: the default `gptforge pretrain` (Shakespeare, characters) in minutes on a laptop CPU
    "micro": dict(_MODERN, n_layer=4, n_head=4, d_model=256, d_ff=704, block_size=256),
    # ~10.7M: nanoGPT's shakespeare-char size (6 x 384, context 256), sized for a CPU
    "nano": dict(_MODERN, n_layer=6, n_head=6, d_model=384, d_ff=1024, block_size=256),
    # ~26M Llama style, the MiniMind2-Small shape (own 6400-token tokenizer)
    "minimind": dict(arch="llama", n_layer=8, n_head=8, n_kv_head=2, d_model=512, d_ff=1408, block_size=512,
                     bias=False, norm_eps=1e-5, rope_theta=1e6),
    # ~51M (GPT-2 tokenizer)
    "tiny": dict(_MODERN, n_layer=8, n_head=8, d_model=512, d_ff=1408, block_size=1024),
    # the sizes of GPT-2 124M / 350M / 774M
    "small": dict(_MODERN, n_layer=12, n_head=12, d_model=768, d_ff=2048, block_size=1024),
    "medium": dict(_MODERN, n_layer=24, n_head=16, d_model=1024, d_ff=2752, block_size=1024),
    "large": dict(_MODERN, n_layer=36, n_head=20, d_model=1280, d_ff=3392, block_size=1024),
    # TinyLlama 1.1B shape
    "llama-1b": dict(arch="llama", n_layer=22, n_head=32, n_kv_head=4, d_model=2048, d_ff=5632, block_size=2048,
                     tie_embeddings=False, bias=False, norm_eps=1e-5, rope_theta=10000.0),
}
NOMINAL_VOCAB: dict[str, int] = {"micro": 128, "nano": 128, "minimind": 6400, "tiny": 50304, "small": 50304,
                                 "medium": 50304, "large": 50304, "llama-1b": 32000}


# The pretraining recipe of each size (`gptforge pretrain` only; SFT and DPO keep their stage defaults): applied
# above the stage's defaults and below a config file and the command line. Chosen by time to a target
# validation loss (README "Time to quality", gptforge bench --to-loss). A resume keeps the recipe its run
# started with (config.loader.restore_recipe), so changing these never alters a run under way.
# Muon on the block matrices, AdamW (train.lr) on embeddings, head and gains, WSD decaying to 0 over the last
# 40%. micro/nano: measured on a CPU (Shakespeare, characters; README "Time to quality"); the AdamW lr scales
# as 1/sqrt(d_model) from the measured 6e-3 at d_model 128. The GPU sizes take the same recipe with Muon's
# published lr and momentum (modded-nanogpt, nanochat: 0.02-0.05, 0.95); not measured here.
def _muon(lr: float, muon_lr: float = 0.03, momentum: float = 0.9) -> dict:
    return {"train": {"optimizer": "muon", "lr": lr, "muon_lr": muon_lr, "muon_momentum": momentum,
                      "schedule": "wsd", "decay_fraction": 0.4, "min_lr_ratio": 0.0}}


PRESET_RECIPES: dict[str, dict] = {
    "micro": _muon(4e-3), "nano": _muon(3.5e-3),
    "minimind": _muon(3e-3, 0.02, 0.95), "tiny": _muon(3e-3, 0.02, 0.95), "small": _muon(2.4e-3, 0.02, 0.95),
    "medium": _muon(2e-3, 0.02, 0.95), "large": _muon(1.8e-3, 0.02, 0.95), "llama-1b": _muon(1.5e-3, 0.02, 0.95),
}


def preset_recipe(name: str) -> dict:
    """{"train": {...}} of a named size for pretraining ({} when it has none)."""
    return PRESET_RECIPES.get(name, {})


def preset_model(name: str, nominal_vocab: bool = False, **overrides) -> GPTConfig:
    """The GPTConfig of a named size (+ overrides). vocab_size stays None (from the tokenizer) unless
    `nominal_vocab` asks for the size's usual one or an override sets it."""
    if name not in MODEL_PRESETS:
        near = difflib.get_close_matches(name, MODEL_PRESETS, n=1)
        hint = f"did you mean '{near[0]}'? " if near else ""
        raise UserError(f"unknown model.preset '{name}'; {hint}choose one of {', '.join(MODEL_PRESETS)}")
    values = {"tie_embeddings": True} | MODEL_PRESETS[name]
    if nominal_vocab:
        values["vocab_size"] = NOMINAL_VOCAB[name]
    return dataclasses.replace(GPTConfig(preset=name, **values), **overrides)
