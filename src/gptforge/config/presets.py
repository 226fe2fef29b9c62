"""Named presets: model sizes (litgpt-style dicts) and per-preset batch profiles."""

from __future__ import annotations

# Nominal vocab_size is the one each size is usually trained with; at train time the vocab of the
# actual tokenizer (rounded up to a multiple of 64) is used unless model.vocab_size is set.
MODEL_PRESETS: dict[str, dict] = {
    # ~3.2M: the default `gptforge pretrain` (Shakespeare, characters) in minutes on a laptop CPU
    "micro": dict(arch="gpt2", n_layer=4, n_head=4, n_kv_head=4, d_model=256, d_ff=1024, block_size=256,
                  vocab_size=128, tie_embeddings=True, bias=True),
    # ~10.7M: nanoGPT's shakespeare-char model, sized for a CPU
    "nano": dict(arch="gpt2", n_layer=6, n_head=6, n_kv_head=6, d_model=384, d_ff=1536, block_size=256,
                 vocab_size=128, tie_embeddings=True, bias=True),
    # ~26M Llama style, the MiniMind2-Small shape (own 6400-token tokenizer)
    "minimind": dict(arch="llama", n_layer=8, n_head=8, n_kv_head=2, d_model=512, d_ff=1408, block_size=512,
                     vocab_size=6400, tie_embeddings=True, bias=False, norm_eps=1e-5, rope_theta=1e6),
    # ~51M GPT-2 style (GPT-2 tokenizer)
    "tiny": dict(arch="gpt2", n_layer=8, n_head=8, n_kv_head=8, d_model=512, d_ff=2048, block_size=1024,
                 vocab_size=50304, tie_embeddings=True, bias=True),
    # GPT-2 124M / 350M / 774M
    "small": dict(arch="gpt2", n_layer=12, n_head=12, n_kv_head=12, d_model=768, d_ff=3072, block_size=1024,
                  vocab_size=50304, tie_embeddings=True, bias=True),
    "medium": dict(arch="gpt2", n_layer=24, n_head=16, n_kv_head=16, d_model=1024, d_ff=4096, block_size=1024,
                   vocab_size=50304, tie_embeddings=True, bias=True),
    "large": dict(arch="gpt2", n_layer=36, n_head=20, n_kv_head=20, d_model=1280, d_ff=5120, block_size=1024,
                  vocab_size=50304, tie_embeddings=True, bias=True),
    # TinyLlama 1.1B shape
    "llama-1b": dict(arch="llama", n_layer=22, n_head=32, n_kv_head=4, d_model=2048, d_ff=5632, block_size=2048,
                     vocab_size=32000, tie_embeddings=False, bias=False, norm_eps=1e-5, rope_theta=10000.0),
}

# Approximate parameter counts, checked by tests/unit/test_model.py.
EXPECTED_PARAMS: dict[str, float] = {
    "micro": 3.2e6, "nano": 10.7e6, "minimind": 25.8e6, "tiny": 51e6, "small": 124e6, "medium": 354e6, "large": 773e6,
    "llama-1b": 1.1e9,
}

# Per-GPU micro-batch x accumulation for 2 nodes x 1 GPU = 256 sequences per optimizer step.
BATCH_PROFILES: dict[str, tuple[int, int]] = {"tiny": (16, 8), "small": (8, 16), "medium": (4, 32)}
