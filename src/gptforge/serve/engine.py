"""The one generation engine under `gptforge generate`, `gptforge chat` and `gptforge serve`.

Sampling (model.sampling.sample_next), stop tokens, stop strings and the KV cache are here once, so a
given seed gives the same text in every command. Two ways to drive it:

- `Engine.run(prompt_ids, params, on_text)`: one sequence in the caller's thread (generate, chat);
- `Engine.start()` + `Engine.submit(seq)`: a scheduler thread runs up to `max_batch` sequences together
  (serve). Continuous batching: a new request is prefilled and joins the running batch between two decode
  steps; a finished or cancelled sequence frees its slot at once.

Every sequence has its own KV cache: a row (slot) of `SlotCache`, with its own length. A decode step feeds
one token per active row at that row's position, with a mask hiding the unused tail of the shorter rows.
Each sequence samples with its own torch.Generator (seeded when the request gives a seed), so its text
does not depend on what else runs in the batch.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from gptforge.model.sampling import StreamDecoder, check_prompt, sample_next


class QueueFull(Exception):
    """Too many requests waiting for a slot (serve answers 429)."""


class SlotCache:
    """Keys/values for `slots` sequences: per layer (slots, n_kv_head, block, head_dim), one length per slot.
    Before each forward, `select(rows, T)` names the rows fed (T new tokens each); the model calls
    `update` per layer and `advance` once (the protocol of model.kv_cache.KVCache)."""

    def __init__(self, model, slots: int):
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


@dataclass
class Params:
    max_tokens: int
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop_ids: frozenset = frozenset()
    stop: tuple[str, ...] = ()


class StopMatcher:
    """Cuts the text at the first stop string; holds back a tail that could still become one."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops, self.pending, self.hit = tuple(s for s in stops if s), "", False

    def push(self, piece: str) -> str:
        text = self.pending + piece
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.hit, self.pending = True, ""
            return text[:cut]
        hold = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self.pending = text[len(text) - hold:] if hold else ""
        return text[:len(text) - hold]

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


@dataclass
class Sequence:
    """One request. `emit(kind, value)` is called from the engine's thread: ("text", str) per piece, then
    ("done", finish_reason) once (finish_reason: "stop", "length", "cancelled" or "error: ...")."""

    prompt: list[int]
    params: Params
    emit: Callable[[str, object], None]
    n_new: int = 0
    finish_reason: str | None = None
    slot: int = -1
    cancelled: bool = False
    last: int = 0
    gen: torch.Generator = field(init=False)

    def __post_init__(self):
        self.gen = torch.Generator()
        if self.params.seed is None:
            self.gen.seed()
        else:
            self.gen.manual_seed(self.params.seed)

    def cancel(self) -> None:
        self.cancelled = True


class Engine:
    def __init__(self, model, tok, max_batch: int = 1, max_queue: int = 64):
        self.model, self.tok = model.eval(), tok
        self.block = model.cfg.block_size
        self.max_batch, self.max_queue = max_batch, max_queue
        self.waiting: deque[Sequence] = deque()
        self.active: list[Sequence] = []
        self._lock, self._wake = threading.Lock(), threading.Event()
        self._thread: threading.Thread | None = None
        self._stop = False
        self._cache: SlotCache | None = None
        self._decoders: dict[int, tuple[StreamDecoder, StopMatcher]] = {}
        self.steps = 0  # decode steps run (stats)
        self.batched_rows = 0  # sum of active rows over those steps
        self.cancelled_total = 0  # sequences dropped because their client went away (stats, /health)

    def check(self, prompt_ids: list[int], params: Params) -> None:
        """The prompt fits the context (one line naming both lengths)."""
        check_prompt(len(prompt_ids), self.block)

    # ---- one step of the model, shared by run() and the scheduler ------------------------------------------
    @torch.no_grad()
    def _forward(self, seqs: list[Sequence], tokens: list[list[int]]) -> None:
        cache = self._cache
        dev = cache.device
        pos, mask = cache.select([s.slot for s in seqs], len(tokens[0]))
        x = torch.tensor(tokens, dtype=torch.long, device=dev)
        logits = self.model(x, kv_cache=cache, attn_mask=mask, positions=pos)[:, -1, :]
        for i, s in enumerate(seqs):
            p = s.params
            s.last = int(sample_next(logits[i:i + 1], p.temperature, p.top_k, p.top_p, s.gen).item())
            self._take(s)

    def _take(self, s: Sequence) -> None:
        """Handle the token just sampled for s: stop id, text, stop string, max_tokens, context end."""
        dec, matcher = self._decoders[id(s)]
        s.n_new += 1  # a stop token counts (usage.completion_tokens), as in OpenAI's and vLLM's usage
        if s.last in s.params.stop_ids:
            return self._finish(s, "stop")
        piece = dec.push(s.last)
        if piece:
            out = matcher.push(piece)
            if out:
                s.emit("text", out)
            if matcher.hit:
                return self._finish(s, "stop")
        if s.n_new >= min(s.params.max_tokens, self.block - len(s.prompt)):
            self._finish(s, "length")

    def _finish(self, s: Sequence, reason: str) -> None:
        dec, matcher = self._decoders.pop(id(s))
        if reason != "stop" or not matcher.hit:
            tail = matcher.flush()
            if tail:
                s.emit("text", tail)
        s.finish_reason = reason
        self._cache.free(s.slot)
        s.emit("done", reason)

    def _begin(self, s: Sequence, slot: int) -> None:
        s.slot = slot
        self._decoders[id(s)] = (StreamDecoder(self.tok), StopMatcher(s.params.stop))
        self._forward([s], [s.prompt])

    # ---- one sequence in the caller's thread (generate, chat) -----------------------------------------------
    def run(self, prompt_ids: list[int], params: Params, on_text: Callable[[str], None] | None = None,
            ) -> tuple[str, str, int]:
        """-> (text, finish_reason, new tokens). Ctrl-C (KeyboardInterrupt) ends it, the text so far emitted."""
        self.check(prompt_ids, params)
        if self._thread is not None:
            raise RuntimeError("Engine.run while the scheduler thread runs: use submit()")
        pieces: list[str] = []

        def emit(kind, value):
            if kind == "text":
                pieces.append(value)
                if on_text:
                    on_text(value)

        s = Sequence(list(prompt_ids), params, emit)
        if self._cache is None:
            self._cache = SlotCache(self.model, 1)
        try:
            self._begin(s, 0)
            while s.finish_reason is None:
                self._forward([s], [[s.last]])
        finally:
            if s.finish_reason is None:
                self._decoders.pop(id(s), None)
                self._cache.free(0)
        return "".join(pieces), s.finish_reason, s.n_new

    # ---- the scheduler (serve) ------------------------------------------------------------------------------
    def start(self) -> "Engine":
        self._cache = SlotCache(self.model, self.max_batch)
        self._thread = threading.Thread(target=self._loop, name="gptforge-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def submit(self, s: Sequence) -> None:
        self.check(s.prompt, s.params)
        with self._lock:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting (the limit is "
                                f"--max-queue {self.max_queue}); retry later")
            self.waiting.append(s)
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop:
            try:
                self._schedule()
            except Exception as e:  # never let one bad step kill the server: fail the running requests
                for s in self.active:
                    if s.finish_reason is None:
                        self._decoders.pop(id(s), None)
                        self._cache.free(s.slot)
                        s.finish_reason = f"error: {type(e).__name__}: {e}"
                        s.emit("done", s.finish_reason)
                self.active = []

    def _schedule(self) -> None:
        self.active = [s for s in self.active if s.finish_reason is None]
        for s in [s for s in self.active if s.cancelled]:
            self._decoders.pop(id(s), None)
            self._cache.free(s.slot)
            s.finish_reason = "cancelled"
            s.emit("done", "cancelled")
            self.cancelled_total += 1
        self.active = [s for s in self.active if s.finish_reason is None]
        free = sorted(set(range(self.max_batch)) - {s.slot for s in self.active})
        while free:  # new requests join between decode steps
            with self._lock:
                s = self.waiting.popleft() if self.waiting else None
            if s is None:
                break
            if s.cancelled:
                s.finish_reason = "cancelled"
                s.emit("done", "cancelled")
                self.cancelled_total += 1
                continue
            try:
                self._begin(s, free.pop(0))
            except Exception as e:  # e.g. out of memory on a long prompt: fail this request only
                self._decoders.pop(id(s), None)
                self._cache.free(s.slot)
                s.finish_reason = f"error: {type(e).__name__}: {e}"
                s.emit("done", s.finish_reason)
            if s.finish_reason is None:
                self.active.append(s)
        if not self.active:
            self._wake.wait(timeout=0.5)
            self._wake.clear()
            return
        self.steps += 1
        self.batched_rows += len(self.active)
        self._forward(self.active, [[s.last] for s in self.active])

