"""Sampling with a KV cache: temperature, top-k, top-p, seed, streaming (the library under `gptforge generate`
and `gptforge chat`; the training loop's text samples use it too)."""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from gptforge.errors import UserError
from gptforge.model.kv_cache import KVCache


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                gen: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) -> next ids (B, 1). temperature 0 = greedy."""
    if temperature <= 0:
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


@torch.no_grad()
def generate_ids(model, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.8,
                 top_k: int | None = 200, top_p: float | None = None, seed: int | None = None,
                 use_cache: bool = True, stop_ids: set[int] | None = None) -> Iterator[int]:
    """Yields new token ids one at a time. Stops at max_new_tokens, a stop id, or the context end."""
    block = model.cfg.block_size
    check_prompt(len(prompt_ids), block)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    cache = KVCache.for_model(model) if use_cache else None
    max_new_tokens = min(max_new_tokens, block - len(prompt_ids))
    x = ids
    try:
        for _ in range(max_new_tokens):
            logits = model(x, kv_cache=cache)[:, -1, :]
            nxt = sample_next(logits, temperature, top_k, top_p, gen)
            tok = int(nxt.item())
            yield tok
            if stop_ids and tok in stop_ids:
                return
            if cache is not None:
                x = nxt
            else:
                ids = torch.cat([ids, nxt], dim=1)
                x = ids
    finally:
        model.train(was_training)


class StreamDecoder:
    """Turns a stream of ids into text pieces; holds back bytes of an unfinished UTF-8 character."""

    def __init__(self, tokenizer):
        self.tok, self.ids, self.emitted = tokenizer, [], ""

    def push(self, tid: int) -> str:
        self.ids.append(tid)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        piece, self.emitted = text[len(self.emitted):], text
        return piece


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 200, temperature: float = 0.8,
                  top_k: int | None = 200, top_p: float | None = None, seed: int | None = None,
                  on_text: Callable[[str], None] | None = None, use_cache: bool = True,
                  info: dict | None = None) -> str:
    """`info` (optional) is filled with new_tokens and stopped: 'eos', 'max_new_tokens' or 'context'."""
    ids = tokenizer.encode(prompt)
    dec = StreamDecoder(tokenizer)
    stop = {tokenizer.eos_id} if getattr(tokenizer, "eos_id", None) is not None else None
    out = []
    info = {} if info is None else info
    info.update(new_tokens=0, stopped="max_new_tokens")
    for tid in generate_ids(model, ids, max_new_tokens, temperature, top_k, top_p, seed, use_cache, stop):
        if stop and tid in stop:
            info["stopped"] = "eos"
            break
        info["new_tokens"] += 1
        piece = dec.push(tid)
        out.append(piece)
        if on_text and piece:
            on_text(piece)
    if info["stopped"] != "eos" and info["new_tokens"] < max_new_tokens:
        info["stopped"] = "context"
    return "".join(out)
