"""Verifiable rewards for GRPO (gptforge.objectives.grpo) and for generative eval tasks (objectives.scoring's
score_generation: `gptforge eval --check`, train.eval_tasks): a completion's text and the record's reference answer
-> a number. grpo.reward names one or several, comma-separated (their rewards add up):

    exact            1 when the completion's final answer equals the reference's, else 0
    number           1 when both final answers are numbers within grpo.tolerance (absolute), else 0
    regex            1 when the completion matches grpo.format_regex (re.search), else 0: a format reward
    MODULE:FUNCTION  the user's own function, imported by name: fn(completion: str, answer: str) -> float

The final answer of a text: what follows the last "####" (GSM8K's convention) when there is one, else its last
number; the reference answer goes through the same rule, so "#### 42", "so 42" and "42" all read 42.
A user function is the user's own code by design (as a Python plugin): it is imported from the current
directory or PYTHONPATH like any module, and runs with the trainer's rights; it is called once per completion.
"""

from __future__ import annotations

import importlib
import math
import re
import sys
from dataclasses import dataclass
from typing import Callable

from gptforge.errors import UserError

RewardFn = Callable[[str, str], float]
BUILTIN = ("exact", "number", "regex")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def final_answer(text: str) -> str:
    """The text after the last "####", else the last number (commas dropped), else the stripped text."""
    if "####" in text:
        return text.rsplit("####", 1)[1].strip().replace(",", "")
    nums = _NUMBER.findall(text)
    return nums[-1].replace(",", "") if nums else text.strip()


def _as_number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def exact_match(completion: str, answer: str) -> float:
    a, b = final_answer(completion), final_answer(answer)
    if a == b:
        return 1.0
    x, y = _as_number(a), _as_number(b)  # "42.0" equals "42"
    return float(x is not None and y is not None and x == y)


def number_reward(tolerance: float) -> RewardFn:
    def reward(completion: str, answer: str) -> float:
        x, y = _as_number(final_answer(completion)), _as_number(final_answer(answer))
        return float(x is not None and y is not None and math.isfinite(x) and abs(x - y) <= tolerance)
    return reward


def regex_reward(pattern: str) -> RewardFn:
    try:
        rx = re.compile(pattern, re.DOTALL)
    except re.error as e:
        raise UserError(f"grpo.format_regex {pattern!r} is not a regular expression ({e}); fix the pattern") from None

    def reward(completion: str, answer: str) -> float:
        return float(rx.search(completion) is not None)
    return reward


def user_function(spec: str) -> RewardFn:
    """MODULE:FUNCTION imported by name (the current directory first, as `python -m` does)."""
    mod_name, _, fn_name = spec.partition(":")
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise UserError(f"grpo.reward={spec}: cannot import module '{mod_name}' ({e}); run from the folder that "
                        "holds it or add that folder to PYTHONPATH") from None
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise UserError(f"grpo.reward={spec}: module '{mod_name}' has no function '{fn_name}'; define "
                        f"def {fn_name}(completion: str, answer: str) -> float there")
    return fn


def build_reward(spec: str, tolerance: float = 1e-6, format_regex: str = "") -> RewardFn:
    """grpo.reward -> fn(completion, answer) -> float (the sum of the named rewards)."""
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if not parts:
        raise UserError("grpo.reward is empty; give exact, number, regex or MODULE:FUNCTION")
    fns = []
    for p in parts:
        if ":" in p:
            fns.append(user_function(p))
        elif p == "exact":
            fns.append(exact_match)
        elif p == "number":
            fns.append(number_reward(tolerance))
        elif p == "regex":
            if not format_regex:
                raise UserError("grpo.reward=regex needs the pattern: --grpo.format_regex=PATTERN")
            fns.append(regex_reward(format_regex))
        else:
            raise UserError(f"grpo.reward: unknown reward '{p}'; use {', '.join(BUILTIN)} or MODULE:FUNCTION")
    if len(fns) == 1:
        return fns[0]
    return lambda completion, answer: sum(float(f(completion, answer)) for f in fns)


def score(fn: RewardFn, completion: str, answer: str, spec: str) -> float:
    """One reward, checked to be a finite number (a user function's mistake named in one line)."""
    r = fn(completion, answer)
    try:
        r = float(r)
    except (TypeError, ValueError):
        raise UserError(f"grpo.reward={spec} returned {type(r).__name__}, not a number; return a float") from None
    if not math.isfinite(r):
        raise UserError(f"grpo.reward={spec} returned {r}; return a finite number")
    return r


@dataclass(frozen=True)
class Check:
    """How a generative task's greedy completions are judged: the reward (grpo.reward's names, comma list: the
    sum), its settings, and the longest completion. A completion is right when its reward is >= 1."""

    reward: str = "exact"
    tolerance: float = 1e-6
    format_regex: str = ""
    max_new_tokens: int = 64

    def build(self) -> RewardFn:
        return build_reward(self.reward, self.tolerance, self.format_regex)
