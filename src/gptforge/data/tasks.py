"""Local task files for `gptforge eval` and evaluation during training: multiple-choice (scored by log-likelihood)
or generative (a greedy completion judged by a reward checker).

A task is a JSONL file, one example per line, in any of these shapes (detected per line; one kind per file):

- ours: ``{"context": "...", "choices": ["...", ...], "label": 0}``
- HellaSwag's own files (``ctx_a``/``ctx_b`` or ``ctx``, ``endings``, ``label``, ``activity_label``),
  turned into text exactly as the LM Evaluation Harness's ``hellaswag`` task does;
- ARC's own files (``question`` as a string with ``choices: {"text", "label"}`` as on the Hugging Face
  hub, or ``question: {"stem", "choices": [{"text", "label"}]}`` as in the original release, and
  ``answerKey``), as the harness's ``arc_easy``/``arc_challenge`` do ("Question: ...\\nAnswer:").

- generative: ``{"prompt": "12+7=", "answer": "19"}`` (``question`` is read as ``prompt``: GSM8K's rows; the
  prompt/answer files of `gptforge grpo`): the model's greedy completion of the prompt is judged against the
  answer by objectives.rewards' checkers (exact, number, regex, MODULE:FUNCTION; metrics acc and reward).

Each choice is scored as the continuation ``" " + choice`` of the context (the harness's default
``target_delimiter``). Errors name the file, the line and what to fix.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from gptforge.data.prompts import to_prompt
from gptforge.errors import UserError

FORMAT = '{"context": "...", "choices": ["...", "..."], "label": 0}'


@dataclass(frozen=True)
class Example:
    context: str
    choices: tuple[str, ...]
    label: int


@dataclass(frozen=True)
class GenExample:
    """A generative example: the prompt and the reference answer its greedy completion is checked against."""
    prompt: str
    answer: str


@dataclass(frozen=True)
class Task:
    name: str
    path: str
    examples: tuple[Example, ...] | tuple[GenExample, ...]
    delimiter: str = " "

    @property
    def generative(self) -> bool:
        return isinstance(self.examples[0], GenExample)


def _hellaswag_text(text: str) -> str:  # the harness's hellaswag `preprocess`
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _is_generative(rec) -> bool:
    return isinstance(rec, dict) and "answer" in rec and not {"choices", "endings", "answerKey"} & rec.keys()


def _example(rec, where: str) -> Example | GenExample:
    if not isinstance(rec, dict):
        raise UserError(f"{where}: each line must be a JSON object like {FORMAT}")
    if _is_generative(rec):
        return GenExample(*to_prompt(rec, where))
    if "endings" in rec:  # HellaSwag
        ctx = rec["ctx_a"] + " " + rec["ctx_b"].capitalize() if "ctx_a" in rec else rec.get("ctx", "")
        context = _hellaswag_text(rec.get("activity_label", "") + ": " + ctx)
        choices, label = [_hellaswag_text(e) for e in rec["endings"]], rec.get("label")
    elif "answerKey" in rec:  # ARC
        q = rec["question"]
        if isinstance(q, dict):  # original release
            stem, texts, keys = q["stem"], [c["text"] for c in q["choices"]], [c["label"] for c in q["choices"]]
        else:  # Hugging Face hub
            stem, texts, keys = q, list(rec["choices"]["text"]), list(rec["choices"]["label"])
        if rec["answerKey"] not in keys:
            raise UserError(f"{where}: answerKey {rec['answerKey']!r} is not one of the choice labels {keys}")
        context, choices, label = f"Question: {stem}\nAnswer:", texts, keys.index(rec["answerKey"])
    else:
        missing = [k for k in ("context", "choices", "label") if k not in rec]
        if missing:
            raise UserError(f"{where}: missing {', '.join(missing)}; each line must look like {FORMAT}")
        context, choices, label = rec["context"], rec["choices"], rec["label"]
    if not isinstance(context, str) or not isinstance(choices, list) or len(choices) < 2 or \
            not all(isinstance(c, str) and c for c in choices):
        raise UserError(f"{where}: 'context' must be a string and 'choices' a list of at least two non-empty "
                        f"strings")
    if isinstance(label, str) and label.strip().isdigit():
        label = int(label)
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(choices):
        raise UserError(f"{where}: 'label' must be the index of the right choice (0..{len(choices) - 1}), "
                        f"got {label!r}")
    return Example(context, tuple(choices), label)


def load_task(path: str | Path, limit: int | None = None) -> Task:
    """Read a local task file (see the module doc). limit: the first N examples only."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"task file {p} does not exist (a local task is a JSONL file, one example per line: "
                        f"{FORMAT})")
    examples = []
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{p}:{n}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            try:
                examples.append(_example(rec, where))
            except (KeyError, TypeError, AttributeError) as e:
                raise UserError(f"{where}: unexpected shape ({type(e).__name__}: {e}); each line must look "
                                f"like {FORMAT}") from None
            if type(examples[-1]) is not type(examples[0]):
                kind = "generative" if isinstance(examples[0], GenExample) else "multiple-choice"
                raise UserError(f"{where}: a {kind} task file cannot hold examples of the other kind; put them in "
                                "two task files")
            if limit and len(examples) >= limit:
                break
    if not examples:
        raise UserError(f"task file {p} has no examples")
    return Task(p.stem, str(p), tuple(examples))


def is_task_file(spec: str) -> bool:
    """A --tasks entry is a local file (a path ending in .jsonl or one that exists) or a harness task name."""
    return spec.endswith((".jsonl", ".json")) or "/" in spec or Path(spec).is_file()
