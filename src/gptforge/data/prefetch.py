"""A loader that prepares the next batches in a background thread while the model trains on this one.

    batches = Prefetcher(train_loader, device, depth=2)   # depth 0: no thread, the same interface
    batch = batches.next_batch()      # on `device`; batches.wait_s grows by the time this call waited

The thread calls the wrapped loader's next_batch() ahead of the loop (at most `depth` batches ready, a
bounded queue), pins the tensors when the device is CUDA, and the caller copies them with
non_blocking=True, so the host->device copy overlaps the previous step's kernels.

Exact resume: state_dict() is the wrapped loader's state right after the last batch *handed out*, never
after the ones still waiting in the queue; load_state_dict() drops the queue and restarts from the state
given. Everything else (windows_per_epoch, iter_eval, ...) is the wrapped loader's. The thread starts on
the first next_batch() and stops on close() (also called when an error or Ctrl-C ends the loop; it is a
daemon thread, so it can never keep the process alive).
"""

from __future__ import annotations

import queue
import threading
import time

import torch


def _pin(batch: dict) -> dict:
    return {k: (v.pin_memory() if torch.is_tensor(v) else v) for k, v in batch.items()}


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


class Prefetcher:
    def __init__(self, loader, device: torch.device, depth: int = 2):
        if depth < 0:
            raise ValueError("depth must be >= 0")
        self.loader, self.device, self.depth = loader, device, depth
        self.pin = device.type == "cuda"
        self.wait_s = 0.0     # total time next_batch() waited for the thread
        self.batches = 0      # batches handed out
        self._state = loader.state_dict()
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop: threading.Event | None = None

    def __getattr__(self, name):  # windows_per_epoch, iter_eval, collate, ...: the wrapped loader's
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)

    # ---- the thread ----------------------------------------------------------------------------
    def _work(self, q: queue.Queue, stop: threading.Event) -> None:
        # put() blocks while the queue is full (no polling: nothing wakes up between steps); close() sets
        # `stop` and then empties the queue, so a blocked put() returns and the loop sees the flag
        try:
            while not stop.is_set():
                batch = self.loader.next_batch()
                q.put((_pin(batch) if self.pin else batch, self.loader.state_dict(), None))
        except BaseException as e:  # handed to the consumer, raised there as it is
            q.put((None, None, e))

    def _start(self) -> None:
        self._queue, self._stop = queue.Queue(maxsize=self.depth), threading.Event()
        self._thread = threading.Thread(target=self._work, args=(self._queue, self._stop),
                                        name="gptforge-prefetch", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the thread, drop what it prepared and rewind the wrapped loader to the last batch handed out
        (a later next_batch() goes on from there)."""
        if self._thread is None:
            return
        self._stop.set()
        while self._thread.is_alive():  # unblock its put() so that it sees the flag
            try:
                self._queue.get(timeout=0.01)
            except queue.Empty:
                pass
        self._thread.join()
        self._thread = self._queue = self._stop = None
        self.loader.load_state_dict(self._state)

    # ---- the loader interface ------------------------------------------------------------------
    def next_batch(self) -> dict:
        t0 = time.perf_counter()
        if self.depth == 0:  # no thread: the loader runs here (and all of its time is waiting)
            batch, state, err = self.loader.next_batch(), None, None
            state = self.loader.state_dict()
        else:
            if self._thread is None:
                self._start()
            batch, state, err = self._queue.get()
        self.wait_s += time.perf_counter() - t0
        if err is not None:
            self.close()
            raise err
        self._state = state
        self.batches += 1
        return to_device(batch, self.device)

    def take_wait_s(self) -> float:
        """The wait time since the last call (for per-log-window reporting)."""
        w, self.wait_s = self.wait_s, 0.0
        return w

    def state_dict(self) -> dict:
        return dict(self._state)

    def load_state_dict(self, state: dict) -> None:
        self.close()
        self.loader.load_state_dict(state)  # raises on a bad state: nothing changed then
        self._state = self.loader.state_dict()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
