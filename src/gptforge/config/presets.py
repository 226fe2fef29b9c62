"""Named model sizes, resolved into a GPTConfig by one function: preset_model()."""

from __future__ import annotations

import dataclasses
import difflib

from gptforge.errors import UserError
from gptforge.model.gpt import GPTConfig

# Shapes (litgpt-style dicts). n_kv_head absent: it follows n_head. The vocabulary is the tokenizer's
# (rounded up to a multiple of 64) unless model.vocab_size is set; NOMINAL_VOCAB is the one each size is
# usually trained with, for estimates made before a tokenizer is known (doctor, cost tables).
MODEL_PRESETS: dict[str, dict] = {
    # ~3.2M: the default `gptforge pretrain` (Shakespeare, characters) in minutes on a laptop CPU
    "micro": dict(arch="gpt2", n_layer=4, n_head=4, d_model=256, d_ff=1024, block_size=256, bias=True),
    # ~10.7M: nanoGPT's shakespeare-char model, sized for a CPU
    "nano": dict(arch="gpt2", n_layer=6, n_head=6, d_model=384, d_ff=1536, block_size=256, bias=True),
    # ~26M Llama style, the MiniMind2-Small shape (own 6400-token tokenizer)
    "minimind": dict(arch="llama", n_layer=8, n_head=8, n_kv_head=2, d_model=512, d_ff=1408, block_size=512,
                     bias=False, norm_eps=1e-5, rope_theta=1e6),
    # ~51M GPT-2 style (GPT-2 tokenizer)
    "tiny": dict(arch="gpt2", n_layer=8, n_head=8, d_model=512, d_ff=2048, block_size=1024, bias=True),
    # GPT-2 124M / 350M / 774M
    "small": dict(arch="gpt2", n_layer=12, n_head=12, d_model=768, d_ff=3072, block_size=1024, bias=True),
    "medium": dict(arch="gpt2", n_layer=24, n_head=16, d_model=1024, d_ff=4096, block_size=1024, bias=True),
    "large": dict(arch="gpt2", n_layer=36, n_head=20, d_model=1280, d_ff=5120, block_size=1024, bias=True),
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
PRESET_RECIPES: dict[str, dict] = {}


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
