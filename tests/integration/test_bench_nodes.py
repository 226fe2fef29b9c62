"""`gptforge bench --nodes 2`: two network-namespace nodes started by the bench itself, a 100 mbit link,
the micro preset, 2 settings; the table has step times, ratios to the compute-only step and losses, the
JSON the same numbers, and no namespace or process is left behind. Needs root and `ip`/`tc`."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from gptforge.bench.netns import PREFIX, unavailable_reason

pytestmark = [pytest.mark.netns, pytest.mark.slow, pytest.mark.timeout(600),
              pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))]


def test_bench_two_nodes_table(tmp_path, char_data):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "gptforge", "bench", "--nodes", "2", "--rate", "100mbit",
                        "--settings", "ddp,bf16", "--steps", "6", "--warmup", "2", "--micro-batch", "4",
                        "--threads", "1", "--data", str(char_data), "--json", str(out), "--",
                        "--model.n_layer=2", "--model.block_size=64"],
                       capture_output=True, text=True, timeout=540)
    assert r.returncode == 0, r.stdout + r.stderr[-4000:]
    lines = r.stdout.splitlines()
    assert "2 nodes, link 100mbit, model micro" in r.stdout, r.stdout
    head = next(i for i, ln in enumerate(lines) if ln.startswith("setting"))
    assert lines[head].split()[:9] == ["setting", "median", "ms", "vs", "compute", "mean", "ms", "vs", "compute"]
    num = r"(\d+\.\d)\s+(\d+\.\d\d)x\s+\d+\.\d\s+\d+\.\d\dx\s+(\d+\.\d{4})"
    rows = {m.group(1): m.groups()[1:] for ln in lines[head + 1:] if (m := re.match(r"(\w+)\s+" + num, ln))}
    assert set(rows) == {"compute", "ddp", "bf16"}, r.stdout
    assert rows["compute"][1] == "1.00"
    for name in ("ddp", "bf16"):
        assert float(rows[name][0]) > 0 and float(rows[name][1]) > 0 and 0 < float(rows[name][2]) < 10
    data = json.loads(out.read_text())
    assert [s["setting"] for s in data["settings"]] == ["ddp", "bf16"]
    for s in data["settings"]:
        assert "error" not in s, s
        assert s["vs_compute"] == pytest.approx(s["step_ms"] / data["compute"]["step_ms"])
        assert s["mean_vs_compute"] == pytest.approx(s["mean_ms"] / data["compute"]["mean_ms"])
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not re.search(rf"^{PREFIX}\d+n", left, re.M), left
