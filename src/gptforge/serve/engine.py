"""`gptforge serve`'s scheduler: a thread that steps the one decode engine (model.engine.Engine) for up to
`max_batch` sequences together.

`BatchEngine.start()` + `submit(seq)`: continuous batching. Between two decode steps the scheduler drops
cancelled sequences (their client went away), prefills waiting ones into free slots, then decodes every
active row in one forward; a finished sequence frees its slot at once. The steps themselves (prefill,
sampling, stop tokens and strings, the end of a sequence) are the engine's, as under generate and chat.
"""

from __future__ import annotations

import threading
from collections import deque

from gptforge.model.engine import Engine, Result, Sequence


class QueueFull(Exception):
    """Too many requests waiting for a slot (serve answers 429)."""


class BatchEngine(Engine):
    def __init__(self, model, tok, max_batch: int = 1, max_queue: int = 64):
        super().__init__(model, tok, slots=max_batch)
        self.max_batch, self.max_queue = max_batch, max_queue
        self.waiting: deque[Sequence] = deque()
        self.active: list[Sequence] = []
        self._lock, self._wake = threading.Lock(), threading.Event()
        self._thread: threading.Thread | None = None
        self._stop = False
        self.steps = 0  # decode steps run (stats)
        self.batched_rows = 0  # sum of active rows over those steps
        self.cancelled_total = 0  # sequences dropped because their client went away (stats, /health)

    def run(self, prompt_ids, params, on_text=None) -> Result:
        if self._thread is not None:
            raise RuntimeError("BatchEngine.run while the scheduler thread runs: use submit()")
        return super().run(prompt_ids, params, on_text)

    def start(self) -> "BatchEngine":
        self.model.eval()
        self._thread = threading.Thread(target=self._loop, name="gptforge-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def submit(self, s: Sequence) -> None:
        self.check(s.prompt)
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
                    self._release(s, f"error: {type(e).__name__}: {e}")
                self.active = []

    def _cancel(self, s: Sequence) -> None:
        self._release(s, "cancelled")
        self.cancelled_total += 1

    def _admit(self, free: list[int]) -> None:
        """Prefill waiting sequences into the free slots (new requests join between decode steps)."""
        while free:
            with self._lock:
                s = self.waiting.popleft() if self.waiting else None
            if s is None:
                return
            if s.cancelled:
                self._cancel(s)
                continue
            try:
                self._begin(s, free.pop(0))
            except Exception as e:  # e.g. out of memory on a long prompt: fail this request only
                self._release(s, f"error: {type(e).__name__}: {e}")
            if s.finish_reason is None:
                self.active.append(s)

    def _schedule(self) -> None:
        for s in self.active:
            if s.cancelled and s.finish_reason is None:
                self._cancel(s)
        self.active = [s for s in self.active if s.finish_reason is None]
        self._admit(sorted(set(range(self.max_batch)) - {s.slot for s in self.active}))
        if not self.active:
            self._wake.wait(timeout=0.5)
            self._wake.clear()
            return
        self.steps += 1
        self.batched_rows += len(self.active)
        self._decode(self.active)
