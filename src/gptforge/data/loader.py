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
import mmap
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


def read_windows(tokens: np.memmap, starts, length: int) -> np.ndarray:
    """tokens[s : s+length] for each start, as int64 rows copied out of the map. The map's pages are then handed
    back to the OS page cache (madvise DONTNEED over the whole map: the kernel maps whole folios and their
    neighbours around each read, so releasing only the rows' pages leaves some behind; the next read faults them
    in again from the cache): a mapped file otherwise stays resident in the process as it is read, so a run over
    a 10 GB shard would end holding ~10 GB of RSS (nanoGPT re-opens its np.memmap for every batch for the same
    reason). Cost: the kernel walks the map's page tables, ~1 ms per batch for a 2 GB split (0.15 ms for the
    read itself), in the prefetch thread."""
    rows = np.stack([tokens[s:s + length] for s in starts]).astype(np.int64)
    mapped = getattr(tokens, "_mmap", None)
    if mapped is not None and hasattr(mmap, "MADV_DONTNEED"):
        mapped.madvise(mmap.MADV_DONTNEED)
    return rows


class UnitLoader:
    """A stateful, rank-aware loader over a list of units (packed rows, examples, pairs).

    Like TokenLoader: a global cursor `pos` over a per-epoch order; rank r's micro-batch is
    order[pos + r*B : pos + (r+1)*B]; an epoch uses the largest multiple of B*dp_size*accum_steps units."""

    def __init__(self, n_units: int, micro_batch: int, dp_rank: int = 0, dp_size: int = 1, seed: int = 0,
                 shuffle: bool = True, accum_steps: int = 1, name: str = "data",
                 unit_name: str = "training units (sequences / pairs)"):
        if micro_batch < 1 or accum_steps < 1:
            raise UserError(f"train.micro_batch ({micro_batch}) and train.grad_accum ({accum_steps}) must be >= 1")
        if not 0 <= dp_rank < dp_size:
            raise UserError(f"dp_rank {dp_rank} is outside 0..{dp_size - 1}")
        self.n, self.B, self.dp_rank, self.dp_size = n_units, micro_batch, dp_rank, dp_size
        self.seed, self.shuffle, self.accum_steps, self.name = seed, shuffle, accum_steps, name
        self.unit_name = unit_name
        self.global_batch = micro_batch * dp_size
        self.per_step = self.global_batch * accum_steps
        self._usable = self.n // self.per_step * self.per_step
        self.epoch, self.pos = 0, 0
        self._order_epoch, self._order = -1, np.empty(0, np.int64)

    @property
    def windows_per_epoch(self) -> int:
        return self.n

    def epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n)
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def _order_for(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            self._order, self._order_epoch = self.epoch_order(epoch), epoch
        return self._order

    def collate(self, units: np.ndarray, step_units: np.ndarray | None) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def next_batch(self) -> dict[str, torch.Tensor]:
        if self._usable == 0:
            raise UserError(f"{self.name}: {self.n} {self.unit_name}, fewer than one global step needs "
                            f"({self.per_step} = micro_batch x grad_accum x dp ranks); "
                            "add data or lower train.micro_batch")
        if self.pos + self.global_batch > self._usable:
            self.epoch, self.pos = self.epoch + 1, 0
        order = self._order_for(self.epoch)
        step_start = self.pos - self.pos % self.per_step
        start = self.pos + self.dp_rank * self.B
        units = order[start:start + self.B]
        self.pos += self.global_batch
        return self.collate(units, order[step_start:step_start + self.per_step])

    def __iter__(self):
        while True:
            yield self.next_batch()

    def iter_eval(self, max_batches: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """Deterministic pass in index order (a tail that does not fill all ranks is dropped)."""
        B = self.B
        if self.n < self.global_batch:
            B = self.n // self.dp_size
            if B == 0:
                return
        G = B * self.dp_size
        n = self.n // G
        if max_batches is not None:
            n = min(n, max_batches)
        for i in range(n):
            start = i * G + self.dp_rank * B
            yield self.collate(np.arange(start, start + B), None)

    def state_dict(self) -> dict:
        return {"epoch": int(self.epoch), "pos": int(self.pos), "seed": int(self.seed)}

    def load_state_dict(self, state: dict) -> None:
        pos = int(state["pos"])
        if pos % self.global_batch:
            raise UserError(f"data-loader position {pos} is not a multiple of the global batch "
                            f"{self.global_batch}; resume with the same global batch size")
        self.epoch, self.pos, self.seed = int(state["epoch"]), pos, int(state["seed"])
        self._order_epoch = -1


class TokenLoader(UnitLoader):
    """Pretraining batches: the units are windows of block_size+1 tokens at stride block_size (consecutive
    windows share one boundary token), read from the memory-mapped split."""

    def __init__(self, data_dir: str | Path, split: str, micro_batch: int, block_size: int,
                 dp_rank: int = 0, dp_size: int = 1, seed: int = 0, shuffle: bool = True, accum_steps: int = 1):
        if block_size < 1:
            raise UserError(f"block_size ({block_size}) must be positive")
        self.data_dir, self.split, self.T = Path(data_dir), split, block_size
        self.tokens = open_tokens(data_dir, split)
        n = len(self.tokens)
        if n < block_size + 1:
            raise UserError(f"{self.data_dir / (split + '.bin')} has {n} tokens, fewer than block_size+1 = "
                            f"{block_size + 1}; use a smaller block_size or more data")
        super().__init__((n - 1) // block_size, micro_batch, dp_rank, dp_size, seed, shuffle, accum_steps,
                         name=str(self.data_dir / (split + ".bin")), unit_name=f"windows of {block_size + 1} tokens")

    def collate(self, units: np.ndarray, step_units: np.ndarray | None) -> dict[str, torch.Tensor]:
        x = torch.from_numpy(read_windows(self.tokens, [w * self.T for w in units], self.T + 1))
        return {"input_ids": x[:, :-1].contiguous(), "labels": x[:, 1:].contiguous()}


class FullPassLoader(TokenLoader):
    """A fixed validation set (data.val_path) scored whole at every evaluation: every token after the first is
    predicted exactly once, with the windows and contexts of `gptforge eval --text` (objectives.scoring,
    rolling_logprob with stride = context): windows w*T .. w*T+T+1, and when (n-1) % T != 0 one more window
    of the last T+1 tokens whose already-scored labels are masked (-100). iter_eval's max_batches is not used.

    Ranks take batches of B consecutive windows (batch i of rank r: windows (i*dp + r)*B ...); rows past the
    end are fully masked, so every rank runs the same number of forwards (FSDP, DDP). Each batch carries
    loss_denom = label tokens of the whole set / (batches * dp ranks): the mean over batches and ranks that
    Trainer.evaluate takes (LMObjective: sum over labels / loss_denom) is then the token mean over the set."""

    def __init__(self, data_dir: str | Path, split: str, micro_batch: int, block_size: int, dp_rank: int = 0,
                 dp_size: int = 1, seed: int = 0, name: str = "the validation set"):
        tokens = open_tokens(data_dir, split)
        if len(tokens) < block_size + 1:
            raise UserError(f"{name} has {len(tokens)} tokens, fewer than one window of block_size+1 = "
                            f"{block_size + 1}; give a longer validation text or use a smaller model.block_size")
        super().__init__(data_dir, split, micro_batch, block_size, dp_rank, dp_size, seed, shuffle=False)

    def windows(self) -> list[tuple[int, int]]:
        """(start, labels masked at the front) of every window, in order."""
        n, T = len(self.tokens), self.T
        out = [(w * T, 0) for w in range((n - 1) // T)]
        rest = (n - 1) % T
        if rest:
            out.append((n - 1 - T, T - rest))
        return out

    def iter_eval(self, max_batches: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
        wins, B, T, dp = self.windows(), self.B, self.T, self.dp_size
        n_batches = -(-len(wins) // (B * dp))
        denom = torch.tensor((len(self.tokens) - 1) / (n_batches * dp), dtype=torch.float32)
        for i in range(n_batches):
            first = (i * dp + self.dp_rank) * B
            rows = [wins[k] if k < len(wins) else (0, T) for k in range(first, first + B)]
            x = torch.from_numpy(read_windows(self.tokens, [s for s, _ in rows], T + 1))
            labels = x[:, 1:].clone()
            for j, (_, skip) in enumerate(rows):
                labels[j, :skip] = -100
            yield {"input_ids": x[:, :-1].contiguous(), "labels": labels, "loss_denom": denom}
