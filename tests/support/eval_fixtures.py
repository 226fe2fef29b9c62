"""Local multiple-choice task files for the eval tests, from the SFT "reverse" task (stage_fixtures)."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

from support.stage_fixtures import HELD_OUT, LETTERS, write_jsonl


def _others(w: str, r: random.Random, exclude: set[str], k: int) -> list[str]:
    perms = sorted({"".join(p) for p in itertools.permutations(w)} - exclude)
    pool = perms if len(perms) >= k else perms + ["".join(r.choice(LETTERS) for _ in w) for _ in range(3 * k)]
    out: list[str] = []
    for x in r.sample(pool, len(pool)):
        if x not in out and x not in exclude:
            out.append(x)
        if len(out) == k:
            return out
    raise AssertionError(w)


def reverse_task(path: Path, n: int = 60, seed: int = 1) -> Path:
    """Trained for: the user says a word, the right reply is the word reversed (3 distractors)."""
    r = random.Random(seed)
    recs = []
    for i in range(n):
        w = HELD_OUT[i] if i < len(HELD_OUT) else "".join(r.choice(LETTERS) for _ in range(4))
        choices = [w[::-1], *_others(w, r, {w[::-1]}, 3)]
        r.shuffle(choices)
        recs.append({"context": w, "choices": choices, "label": choices.index(w[::-1])})
    return write_jsonl(path, recs)


def sort_task(path: Path, n: int = 120, seed: int = 2) -> Path:
    """Not trained for: the right reply is the word's letters sorted; the reversal is never a choice."""
    r = random.Random(seed)
    recs = []
    while len(recs) < n:
        w = "".join(r.sample(LETTERS, 4))
        s = "".join(sorted(w))
        if s in (w, w[::-1]):
            continue
        choices = [s, *_others(w, r, {s, w[::-1]}, 3)]
        r.shuffle(choices)
        recs.append({"context": w, "choices": choices, "label": choices.index(s)})
    return write_jsonl(path, recs)
