"""examples/grpo_arithmetic/run.py end to end with a few steps (its full run is the README's numbers): the data
files, SFT, held-out accuracy, GRPO and REPORT.md, through the real CLI in child processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import ROOT


def test_grpo_example_runs(tmp_path):
    out = tmp_path / "ex"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, str(ROOT / "examples/grpo_arithmetic/run.py"), "--out", str(out),
                        "--sft-steps", "30", "--grpo-steps", "3", "--heldout", "20"], capture_output=True, text=True,
                       timeout=600, env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    held = [json.loads(x) for x in (out / "data/heldout.jsonl").read_text().splitlines()]
    train = [json.loads(x) for x in (out / "data/prompts.jsonl").read_text().splitlines()]
    assert len(held) == 20 and len(train) == 9980 and not {h["prompt"] for h in held} & {t["prompt"] for t in train}
    a, b = held[0]["prompt"].split("+")
    assert held[0]["answer"] == str(int(a) + int(b))
    report = (out / "REPORT.md").read_text()
    assert "held-out (20 questions, greedy, exact match): SFT " in report and "| 1-3 |" in report
    assert "held-out exact match after GRPO" in p.stdout
