"""A static key/value cache for incremental decoding: one preallocated buffer per layer."""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, n_layer: int, batch: int, n_kv_head: int, max_len: int, head_dim: int,
                 device=None, dtype=torch.float32):
        shape = (batch, n_kv_head, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.length = 0  # tokens already stored

    @classmethod
    def for_model(cls, model, batch: int = 1, max_len: int | None = None) -> "KVCache":
        c = model.cfg
        p = next(model.parameters())
        return cls(c.n_layer, batch, c.n_kv_head, max_len or c.block_size, c.head_dim, p.device, p.dtype)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store the new keys/values at [length, length+T) and return everything up to there."""
        end = self.length + k.shape[2]
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def reset(self) -> None:
        self.length = 0
