"""Numerical faults in the training loop: a step whose loss or gradient norm is not finite is skipped (no
update) and counted; after train.max_bad_steps in a row the Trainer rolls back to the last checkpoint or stops
(train.on_bad_steps). Loss spikes (above train.spike_factor x the running median) are warned about and counted.

Fault injection for tests and drills: GPTFORGE_INJECT_NAN_AT_STEP=3 (or "5,6") makes the loss of those
optimizer steps (numbered as logged, from 1) NaN, once per step number and process: a transient fault, so a
rollback replays those steps cleanly."""

from __future__ import annotations

import os
import statistics
from collections import deque

from gptforge.errors import UserError

INJECT_ENV = "GPTFORGE_INJECT_NAN_AT_STEP"
SPIKE_WINDOW = 50  # losses in the running median
SPIKE_MIN = 10  # losses seen before spikes are judged


class StepGuard:
    def __init__(self, tcfg, say):
        # train.max_bad_steps >= 1 and train.spike_factor >= 0: checked with the config (TrainSection.check)
        self.max_bad, self.action, self.factor, self.say = tcfg.max_bad_steps, tcfg.on_bad_steps, tcfg.spike_factor, say
        self.bad_total = self.bad_in_row = self.spikes = 0
        self.recent: deque[float] = deque(maxlen=SPIKE_WINDOW)
        raw = os.environ.get(INJECT_ENV, "").strip()
        try:
            self.inject_at = {int(x) for x in raw.replace(" ", "").split(",") if x}
        except ValueError:
            raise UserError(f"{INJECT_ENV}={raw!r}: give optimizer step numbers, e.g. 3 or 5,6") from None

    def inject(self, step: int) -> bool:
        """Should step `step` (1-based) get a NaN loss? True once per step number."""
        if step in self.inject_at:
            self.inject_at.discard(step)
            return True
        return False

    def observe(self, step: int, loss: float, norm: float, finite: bool) -> str | None:
        """After step `step`: None to go on, or train.on_bad_steps ("rollback" | "stop") after K bad in a row."""
        if not finite:
            self.bad_total += 1
            self.bad_in_row += 1
            self.say(f"warning: step {step}: loss {loss} / gradient norm {norm} not finite: update skipped "
                     f"({self.bad_in_row} in a row of at most train.max_bad_steps={self.max_bad}, {self.bad_total} in all)")
            return self.action if self.bad_in_row >= self.max_bad else None
        self.bad_in_row = 0
        if self.factor and len(self.recent) >= SPIKE_MIN:
            med = statistics.median(self.recent)
            if loss > self.factor * med:
                self.spikes += 1
                self.say(f"warning: step {step}: loss spike {loss:.4f} > {self.factor:g} x running median {med:.4f} "
                         f"({self.spikes} so far; train.spike_factor)")
        self.recent.append(loss)
        return None

    def state_dict(self) -> dict:
        return {"bad_steps": self.bad_total, "loss_spikes": self.spikes}

    def load_state_dict(self, state: dict) -> None:
        self.bad_total, self.spikes = int(state.get("bad_steps", 0)), int(state.get("loss_spikes", 0))
        self.bad_in_row = 0
