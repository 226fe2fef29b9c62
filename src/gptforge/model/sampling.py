"""Choosing the next token (temperature, top-k, top-p, a seeded generator) and the checks of the sampling flags.
The decode loop that calls it, with the KV cache, stop tokens and streaming, is model.engine.Engine."""

from __future__ import annotations

import torch

from gptforge.errors import UserError


GREEDY_BELOW = 1e-5  # as vLLM's _SAMPLING_EPS


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                gen: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) -> next ids (B, 1). temperature below GREEDY_BELOW = greedy (its limit; dividing by a
    smaller one overflows float32 into NaN probabilities)."""
    if temperature < GREEDY_BELOW:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, idx = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest set whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs.cpu(), 1, generator=gen).to(logits.device)


def check_sampling(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None) -> None:
    """The sampling flags of generate and chat, checked before any model is loaded (one line naming the flag)."""
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if not (temperature >= 0 and temperature < float("inf")):
        raise UserError(f"--temperature must be >= 0 (0 = greedy, e.g. 0.8), got {temperature}")
    if top_k is not None and top_k < 0:
        raise UserError(f"--top-k must be >= 0 (0 = all tokens, e.g. 50), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1] (e.g. 0.9; leave it out for no nucleus cut), got {top_p}")


def check_prompt(n_tokens: int, block_size: int) -> None:
    if n_tokens == 0:
        raise UserError("the prompt is empty; give at least one token of text")
    if n_tokens >= block_size:
        raise UserError(f"the prompt is {n_tokens} tokens but the context is {block_size}; shorten the prompt")
