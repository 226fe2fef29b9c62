"""JSON records for the training stages (SFT conversations, DPO pairs): every record named by where it
came from ('file:line', 'file[i]' in a JSON array, 'path[row i]' in a dataset), malformed ones either
stopping the run with that name or skipped and counted (--data.skip_bad_lines=true), and a seeded
held-out split. What the user may pass as --data.path is sources.py's (files, folders, globs, comma
lists, Hugging Face datasets)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from gptforge.data.sources import RECORD_FOLDER_SUFFIXES, iter_values, resolve_inputs
from gptforge.errors import UserError

SKIP_HINT = "pass --data.skip_bad_lines=true"
T = TypeVar("T")


@dataclass
class DataStats:
    records: int = 0
    bad_lines: int = 0
    examples: int = 0
    truncated: int = 0
    dropped_long: int = 0
    dropped_empty: int = 0
    first_bad: str = ""
    extra: dict = field(default_factory=dict)

    def bad(self, where: str, why: str) -> None:
        self.bad_lines += 1
        if not self.first_bad:
            self.first_bad = f"{where}: {why}"

    def summary(self, what: str = "conversations") -> str:
        s = (f"{self.records} {what} -> {self.examples} examples; {self.truncated} truncated, "
             f"{self.dropped_long} dropped as too long, {self.dropped_empty} dropped with nothing to learn")
        if self.extra.get("identical"):
            s += f", {self.extra['identical']} dropped as chosen identical to rejected"
        if self.bad_lines:
            s += f", {self.bad_lines} malformed lines skipped (first: {self.first_bad})"
        return s


def iter_records(spec, skip_bad: bool, stats: DataStats) -> Iterator[tuple[str, object]]:
    """(where, parsed JSON value or dataset row) for every record of --data.path; lines that are not
    JSON are skipped and counted in `stats` when skip_bad, else a UserError names them."""
    sources = resolve_inputs(spec, suffixes=RECORD_FOLDER_SUFFIXES, flag="--data.path")
    on_bad = stats.bad if skip_bad else None
    for src in sources:
        yield from iter_values(src, on_bad, hint=f"fix the line or {SKIP_HINT}")


def read_records(spec, parse: Callable[[object, str], T], skip_bad: bool, stats: DataStats) -> Iterator[T]:
    """parse(record, where) over every record; a record it rejects (UserError) is skipped and counted
    when skip_bad, else stops the run naming its place."""
    for where, obj in iter_records(spec, skip_bad, stats):
        try:
            item = parse(obj, where)
        except UserError as e:
            if not skip_bad:
                raise UserError(f"{e}; fix it or {SKIP_HINT}") from None
            stats.bad(where, str(e).split(": ", 1)[-1])
            continue
        yield item


def split_val(items: list, val_fraction: float, seed: int = 0) -> tuple[list, list]:
    """A seeded held-out split (none when the data is too small for even one validation item)."""
    n = len(items)
    n_val = int(round(n * val_fraction)) if n >= 20 else 0
    if n_val == 0:
        return items, []
    perm = np.random.default_rng(seed).permutation(n)
    val_idx = set(perm[:n_val].tolist())
    return [x for i, x in enumerate(items) if i not in val_idx], [x for i, x in enumerate(items) if i in val_idx]
