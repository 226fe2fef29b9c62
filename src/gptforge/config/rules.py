"""The rules a config value is checked against (each section's check() in config.schema): a broken rule is one
UserError line naming the config key, the rule, the value and, where there is one, the fix."""

from __future__ import annotations

import math

from gptforge.errors import UserError, show_value


def fail(key: str, rule: str, value, fix: str = "") -> None:
    raise UserError(f"config key '{key}' must be {rule}, got {show_value(value)}" + (f"; {fix}" if fix else ""))


def positive(key: str, v, fix: str = "") -> None:
    if not (v > 0 and math.isfinite(v)):
        fail(key, "a positive number", v, fix)


def at_least(key: str, v, low: int, fix: str = "") -> None:
    if v < low:
        fail(key, f">= {low}", v, fix)


def in_range(key: str, v, low: float, high: float, fix: str = "", high_open: bool = True) -> None:
    ok = low <= v < high if high_open else low <= v <= high
    if not ok:
        fail(key, f"in [{low}, {high}{')' if high_open else ']'}", v, fix)


def finite(key: str, v) -> None:
    if not math.isfinite(v):
        fail(key, "a finite number", v)
