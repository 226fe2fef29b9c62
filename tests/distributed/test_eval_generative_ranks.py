"""`gptforge eval` of a generative task (prompt/answer lines, --check) under `gptforge launch` with 2 gloo ranks:
each rank decodes its share of the prompts (i % 2 == rank, uneven: 4 and 3, in batches of 2) and rank 0 gathers
them; the result (every completion, acc, reward) equals one process's, and the accuracy is the one the answers
were built for."""

from __future__ import annotations

import json

import pytest

from distributed._harness import launch
from gptforge.cli import main

pytestmark = pytest.mark.timeout(300)

PROMPTS = ["ROMEO:", "KING HENRY", "To be, or", "First Citizen:\n", "O", "What say you", "My lord,"]


def _greedy(run, n_new: int) -> list[str]:
    """Each prompt's greedy completion, decoded alone (no batch, one process), end tokens left out."""
    from gptforge.hf.inference import load_for_inference
    from gptforge.model.engine import Engine, Params

    model, tok, _ = load_for_inference(str(run), "cpu")
    stops = frozenset(tok.end_ids)
    out = []
    for p in PROMPTS:
        r = Engine(model, tok).run(tok.encode_prompt(p), Params(n_new, 0.0, stop_ids=stops))
        out.append(tok.decode([t for t in r.ids if t not in stops]))
    return out


def test_generative_eval_two_ranks_equals_one_process(tmp_path, trained_run):
    comps = _greedy(trained_run, 6)
    right = {0, 3, 4, 6}  # rank 0 holds 0, 2, 4, 6; rank 1 holds 1, 3, 5: both have right and wrong answers
    task = tmp_path / "gen.jsonl"
    task.write_text("".join(json.dumps({"prompt": p, "answer": c if i in right else "#### no such answer"}) + "\n"
                            for i, (p, c) in enumerate(zip(PROMPTS, comps))))
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    args = ["--checkpoint", str(trained_run), "--tasks", str(task), "--max-new-tokens", "6", "--batch-size", "2",
            "--tensorboard=false"]
    assert main(["eval", *args, "--out", str(one)]) == 0
    launch(2, ["eval", *args, "--out", str(two)], timeout=240)
    a, b = (json.loads(p.read_text()) for p in (one, two))
    assert (a["ranks"], b["ranks"]) == (1, 2)
    ra, rb = a["results"][0], b["results"][0]
    assert ra["examples"] == rb["examples"] == 7
    assert [rb["per_example"][str(i)]["completion"] for i in range(7)] == comps  # each rank decoded its share
    assert ra["per_example"] == rb["per_example"]
    assert ra["metrics"] == rb["metrics"] and rb["metrics"]["acc"]["value"] == pytest.approx(4 / 7, abs=1e-12)
