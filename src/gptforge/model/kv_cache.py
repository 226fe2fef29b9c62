"""The key/value cache of incremental decoding (the one cache: model.engine.Engine drives it).

One preallocated buffer per layer for `slots` sequences, (slots, n_kv_head, block, head_dim), and one length
per slot. Before each forward the caller names the rows it feeds and how many tokens each gets
(`select(rows, T)` -> positions and the attention mask to pass to the model); the model then calls `update`
once per layer and `advance` once (GPT.forward). Rows may hold sequences of different lengths: the mask
hides the unused tail of the shorter ones, so several sequences decode together in one forward.
"""

from __future__ import annotations

import torch


class SlotCache:
    def __init__(self, model, slots: int = 1):
        c, p = model.cfg, next(model.parameters())
        shape = (slots, c.n_kv_head, c.block_size, c.head_dim)
        self.k = [torch.zeros(shape, device=p.device, dtype=p.dtype) for _ in range(c.n_layer)]
        self.v = [torch.zeros(shape, device=p.device, dtype=p.dtype) for _ in range(c.n_layer)]
        self.lengths = [0] * slots
        self.device = p.device
        self.rows: list[int] = []
        self.length = 0  # the model checks length + T <= block: the longest selected row

    def select(self, rows: list[int], T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (positions (B, T), attention mask (B, 1, T, L)) for feeding T tokens to each of `rows`."""
        self.rows = rows
        self._rows_t = torch.tensor(rows, device=self.device)
        lens = torch.tensor([self.lengths[r] for r in rows], device=self.device)
        self._lens_t = lens
        self.length = max(self.lengths[r] for r in rows)
        L = self.length + T
        pos = lens[:, None] + torch.arange(T, device=self.device)[None, :]  # (B, T)
        keys = torch.arange(L, device=self.device)
        mask = keys[None, None, :] <= pos[:, :, None]  # causal within the row, nothing past its end
        return pos, mask[:, None]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store the new keys/values of the selected rows at their own positions; return each selected row's
        keys/values up to the longest one (B, n_kv_head, L, head_dim)."""
        T, L = k.shape[2], self.length + k.shape[2]
        if T == 1:  # decode: one token per row, each at its own position
            self.k[layer][self._rows_t, :, self._lens_t] = k[:, :, 0]
            self.v[layer][self._rows_t, :, self._lens_t] = v[:, :, 0]
        else:
            for i, r in enumerate(self.rows):
                n = self.lengths[r]
                self.k[layer][r, :, n:n + T] = k[i]
                self.v[layer][r, :, n:n + T] = v[i]
        return (self.k[layer][:, :, :L].index_select(0, self._rows_t),
                self.v[layer][:, :, :L].index_select(0, self._rows_t))

    def advance(self, n: int) -> None:
        for r in self.rows:
            self.lengths[r] += n

    def free(self, row: int) -> None:
        self.lengths[row] = 0
