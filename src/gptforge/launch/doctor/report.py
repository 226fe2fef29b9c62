"""The doctor's output: one line per check (PASS / WARN / FAIL with the fix, or INFO) and the counts."""

from __future__ import annotations

import sys

PASS, WARN, FAIL, INFO = "PASS", "WARN", "FAIL", "INFO"


class Report:
    def __init__(self, node_rank: int, out=None):
        self.node_rank = node_rank
        self.out = out or sys.stdout
        self.counts = {PASS: 0, WARN: 0, FAIL: 0, INFO: 0}

    def __call__(self, status: str, what: str, detail: str = "", fix: str = "") -> None:
        self.counts[status] += 1
        line = f"[{status}] {what}"
        if detail:
            line += f": {detail}"
        print(line, file=self.out, flush=True)
        if fix and status in (WARN, FAIL):
            print(f"       fix: {fix}", file=self.out, flush=True)

    @property
    def failed(self) -> bool:
        return self.counts[FAIL] > 0

    def summary(self, seconds: float) -> str:
        c = self.counts
        return f"doctor: {c[PASS]} passed, {c[WARN]} warnings, {c[FAIL]} failed ({seconds:.0f} s)"
