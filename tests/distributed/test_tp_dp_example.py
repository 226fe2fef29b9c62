"""examples/tp_dp_mlp.py: TP=2 x DP=2 on 4 CPU ranks, started by `gptforge launch`, equals one process."""

from __future__ import annotations

import importlib.util
import json
import re
import sys

import pytest

from distributed._harness import ROOT, assert_losses_close, check_clean, run

pytestmark = pytest.mark.timeout(240)
EXAMPLE = ROOT / "examples" / "tp_dp_mlp.py"


def test_tp2_dp2_example_matches_single_process(tmp_path):
    spec = importlib.util.spec_from_file_location("tp_dp_mlp", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    single = tmp_path / "single.json"
    assert mod.main(["--steps", "5", "--out", str(single)]) == 0

    dist_out = tmp_path / "dist.json"
    job = run([sys.executable, "-m", "gptforge", "launch", "--nproc-per-node", "4", "--",
               str(EXAMPLE), "--tp", "2", "--steps", "5", "--out", str(dist_out)], timeout=180)
    check_clean(job)
    pat = r"\[Rank (\d+)\] DP rank: \d+, TP mesh: \[[\d, ]*\], DP mesh: \[[\d, ]*\]"
    lines = {int(m.group(1)): m.group(0) for m in re.finditer(pat, job.output)}
    assert sorted(lines) == [0, 1, 2, 3], job.output[-3000:]
    for r, line in lines.items():
        d, t = r // 2, r % 2
        assert line == f"[Rank {r}] DP rank: {d}, TP mesh: [{2 * d}, {2 * d + 1}], DP mesh: [{t}, {t + 2}]", line
    assert_losses_close(json.loads(dist_out.read_text()), json.loads(single.read_text()))
