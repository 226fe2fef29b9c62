"""Stateful, resumable, rank-aware batches from a prepared token directory (see data/prepare.py).

Windows: the split's token stream is cut into windows of block_size+1 tokens with stride block_size, so
consecutive windows share one boundary token and every token (but the first) is a label exactly once.
Window w holds tokens[w*T : w*T+T+1]; input_ids = its first T tokens, labels = its last T.

Order: each epoch visits the windows in a permutation seeded by (seed, epoch) (identity if shuffle=False).

Global cursor: `pos` counts windows consumed by all ranks together. next_batch() on rank r returns windows
perm[pos + r*B : pos + (r+1)*B] and advances pos by dp_size*B. An epoch uses the largest multiple of
dp_size*B*accum_steps windows (the tail is dropped) and then wraps to the next epoch. Hence one process with
B=8, two ranks with B=4, or four accumulation micro-steps of B=2 see exactly the same windows, and a
state_dict() saved at one dp_size resumes at another as long as the global batch is the same.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from gptforge.errors import UserError


def read_meta(data_dir: str | Path) -> dict:
    meta = Path(data_dir) / "meta.json"
    if not meta.is_file():
        raise UserError(f"'{data_dir}' is not a prepared dataset (no meta.json); "
                        "run: gptforge prepare --input YOUR_TEXT --out DIR")
    return json.loads(meta.read_text())


def open_tokens(data_dir: str | Path, split: str) -> np.memmap:
    """The split's tokens as a read-only memory map."""
    meta = read_meta(data_dir)
    path = Path(data_dir) / f"{split}.bin"
    if not path.is_file():
        raise UserError(f"missing {path}; re-run gptforge prepare for '{data_dir}'")
    dtype = np.dtype(meta["dtype"]).newbyteorder("<")
    if path.stat().st_size % dtype.itemsize or path.stat().st_size == 0:
        raise UserError(f"{path} is empty or truncated ({path.stat().st_size} bytes of {meta['dtype']}); "
                        "re-run gptforge prepare")
    return np.memmap(path, dtype=dtype, mode="r")


class TokenLoader:
    def __init__(self, data_dir: str | Path, split: str, micro_batch: int, block_size: int,
                 dp_rank: int = 0, dp_size: int = 1, seed: int = 0, shuffle: bool = True, accum_steps: int = 1):
        if micro_batch < 1 or block_size < 1 or accum_steps < 1:
            raise UserError(f"micro_batch ({micro_batch}), block_size ({block_size}) and accum_steps "
                            f"({accum_steps}) must be positive")
        if not 0 <= dp_rank < dp_size:
            raise UserError(f"dp_rank {dp_rank} is outside 0..{dp_size - 1}")
        self.data_dir, self.split = Path(data_dir), split
        self.B, self.T = micro_batch, block_size
        self.dp_rank, self.dp_size, self.accum_steps = dp_rank, dp_size, accum_steps
        self.seed, self.shuffle = seed, shuffle
        self.tokens = open_tokens(data_dir, split)
        n = len(self.tokens)
        if n < block_size + 1:
            raise UserError(f"{self.data_dir / (split + '.bin')} has {n} tokens, fewer than block_size+1 = "
                            f"{block_size + 1}; use a smaller block_size or more data")
        self._windows = (n - 1) // block_size
        self.global_batch = micro_batch * dp_size  # windows consumed per next_batch() call, all ranks
        per_step = self.global_batch * accum_steps
        self._usable = self._windows // per_step * per_step
        self._epoch, self.pos = 0, 0
        self._perm_epoch, self._perm = -1, np.empty(0, np.int64)

    # ---------------------------------------------------------------------------------------- properties
    @property
    def windows_per_epoch(self) -> int:
        return self._windows

    @property
    def tokens_per_epoch(self) -> int:
        """Label tokens one epoch trains on (after dropping the tail that does not fill a global step)."""
        return self._usable * self.T

    @property
    def epoch(self) -> int:
        return self._epoch

    # ---------------------------------------------------------------------------------------- batches
    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            if self.shuffle:
                self._perm = np.random.default_rng([self.seed, epoch]).permutation(self._windows)
            else:
                self._perm = np.arange(self._windows)
            self._perm_epoch = epoch
        return self._perm

    def _batch(self, windows: np.ndarray) -> dict[str, torch.Tensor]:
        rows = np.stack([self.tokens[w * self.T: w * self.T + self.T + 1] for w in windows]).astype(np.int64)
        x = torch.from_numpy(rows)
        return {"input_ids": x[:, :-1].contiguous(), "labels": x[:, 1:].contiguous()}

    def next_batch(self) -> dict[str, torch.Tensor]:
        """This rank's next micro-batch: {"input_ids": LongTensor(B, T), "labels": LongTensor(B, T)}."""
        if self._usable == 0:
            raise UserError(f"{self.data_dir / (self.split + '.bin')} has {self._windows} windows of "
                            f"{self.T + 1} tokens, fewer than one global step needs "
                            f"({self.global_batch * self.accum_steps}); lower the batch size or block_size")
        if self.pos + self.global_batch > self._usable:
            self._epoch, self.pos = self._epoch + 1, 0
        start = self.pos + self.dp_rank * self.B
        windows = self._permutation(self._epoch)[start: start + self.B]
        self.pos += self.global_batch
        return self._batch(windows)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def iter_eval(self, max_batches: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """Deterministic pass over the split from its start, in order, without touching the cursor.

        Batch i on rank r holds windows i*G + r*B ... + B (G = dp_size*B); a tail shorter than G is dropped,
        unless no full batch fits, in which case every rank gets one batch of windows // dp_size."""
        B = self.B
        if self._windows < self.global_batch:
            B = self._windows // self.dp_size
            if B == 0:
                raise UserError(f"{self.data_dir / (self.split + '.bin')} has {self._windows} windows of "
                                f"{self.T + 1} tokens, fewer than the {self.dp_size} ranks; add data or lower block_size")
        G = B * self.dp_size
        n = self._windows // G
        if max_batches is not None:
            n = min(n, max_batches)
        for i in range(n):
            start = i * G + self.dp_rank * B
            yield self._batch(np.arange(start, start + B))

    # ---------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, int]:
        return {"epoch": int(self._epoch), "pos": int(self.pos), "seed": int(self.seed)}

    def load_state_dict(self, state: dict) -> None:
        pos = int(state["pos"])
        if pos % self.global_batch:
            raise UserError(f"data-loader position {pos} is not a multiple of the global batch "
                            f"{self.global_batch} windows; resume with the same global batch size")
        self._epoch, self.pos, self.seed = int(state["epoch"]), pos, int(state["seed"])
        self._perm_epoch = -1
