"""The README's main job, shortened: `gptforge pretrain` on the built-in corpus, through the console
script, learns well below the corpus' unigram entropy and prints the llm.c-style lines and a sample."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np


def test_default_pretrain_learns_shakespeare(tmp_path):
    exe = Path(sys.executable).with_name("gptforge")
    cmd = [str(exe), "pretrain", f"--train.out_dir={tmp_path}", "--train.max_steps=150", "--train.micro_batch=16",
           "--train.eval_every=75", "--train.log_every=25", "--train.sample_tokens=200"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=1500)
    assert p.returncode == 0, p.stderr[-3000:]
    out = p.stdout
    # llm.c-style step lines
    assert re.search(r"step +25/150 \| loss \d+\.\d{4} \| lr [\d.e+-]+ \| norm [\d.]+ \| [\d.]+ ms \| [\d,]+ tok/s "
                     r"\| MFU [\d.]+% \| data [\d.]+ ms \| eta \d+m\d\ds", out), out[:2000]
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model"]["preset"] == "micro" and cfg["data"]["path"] is None
    # unigram entropy of the prepared corpus (nats/char)
    data_dir = Path(re.search(r"data: (\S+)", out).group(1))
    counts = np.bincount(np.fromfile(data_dir / "train.bin", dtype=np.uint16)).astype(float)
    prob = counts[counts > 0] / counts.sum()
    entropy = float(-(prob * np.log(prob)).sum())
    assert 3.0 < entropy < 3.6, entropy
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    val = [r["val/loss"] for r in rows if "val/loss" in r]
    assert len(val) == 2 and val[-1] < entropy - 0.7, (val, entropy)
    # the run ends with a sample of text, mostly letters and spaces
    sample = out.split("---- sample ----")[1].split("----------------")[0]
    assert len(sample) > 150
    letters = sum(c.isalpha() or c.isspace() for c in sample) / len(sample)
    assert letters > 0.85, sample
    assert (tmp_path / "tb").is_dir() and any((tmp_path / "tb").iterdir())
