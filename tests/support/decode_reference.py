"""The reference the decode engine (gptforge.model.engine) is checked against: a plain loop with no KV cache
that runs the whole sequence through the model at every step. Greedy is a bare argmax; sampling draws with
model.sampling.sample_next from one seeded CPU generator, as the engine's sequences do."""

from __future__ import annotations

import torch

from gptforge.model.sampling import sample_next


@torch.no_grad()
def recompute_decode(model, prompt: list[int], n: int, temperature: float = 0.0, top_k: int | None = None,
                     top_p: float | None = None, seed: int | None = None, stop_ids=()) -> list[int]:
    """-> the new ids: up to n (fewer at the context's end), the stop id that ended it included."""
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    device = next(model.parameters()).device
    ids = list(prompt)
    try:
        for _ in range(min(n, model.cfg.block_size - len(prompt))):
            logits = model(torch.tensor([ids], device=device))[:, -1, :]
            if temperature == 0:
                nxt = int(logits[0].argmax())
            else:
                nxt = int(sample_next(logits, temperature, top_k, top_p, gen).item())
            ids.append(nxt)
            if nxt in stop_ids:
                break
    finally:
        model.train(was_training)
    return ids[len(prompt):]
