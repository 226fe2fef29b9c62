"""`gptforge bench` on one device: --compare and --sweep, real runs of a tiny model (fresh processes, a few
steps). The JSON of --single is checked by the gpu_check dry run (test_scripts_dryrun.py)."""

from __future__ import annotations

import json
import re

import pytest

from conftest import TINY_MODEL
from gptforge.bench.compare import schedule
from gptforge.bench.device import parse_size, setting_args
from gptforge.cli import main
from gptforge.errors import UserError

TINY = [a for a in TINY_MODEL if not a.startswith("--model.preset")]


def bench(capsys, data, *args: str) -> str:
    capsys.readouterr()
    assert main(["bench", "--data", str(data), "--steps", "2", "--warmup", "1", *args]) == 0
    return capsys.readouterr().out


def test_compare_prints_the_ratio_of_its_own_medians(tmp_path, capsys, char_data):
    out = bench(capsys, char_data, "--compare", "--train.precision=fp32", "train.micro_batch=2 train.lr=1e-3",
                "--micro-batch", "4", "--rounds", "1", "--json", str(tmp_path / "c.json"), "--", *TINY)
    d = json.loads((tmp_path / "c.json").read_text())
    a, b = d["A"], d["B"]
    assert d["order"] == ["A1", "B1"] and (a["runs"], b["runs"]) == (1, 1)
    assert (a["tokens_per_step"], b["tokens_per_step"]) == (4 * 64, 2 * 64)  # micro-batch x context
    # each run reports what it resolved (its config.json), not the bench defaults B's options replaced
    assert {r["name"]: (r["micro_batch"], r["block_size"]) for r in d["runs"]} == {"A1": (4, 64), "B1": (2, 64)}
    for r in (a, b):
        assert r["tokens_per_s"] == pytest.approx(r["tokens_per_step"] / (r["step_ms"] / 1000))
        assert r["peak_memory_bytes"] > 100 * 2**20 and r["peak_memory_kind"] == "peak RSS"
    assert d["ratio_b_over_a"]["step_ms"] == pytest.approx(b["step_ms"] / a["step_ms"])
    assert d["ratio_b_over_a"]["tokens_per_s"] == pytest.approx(b["tokens_per_s"] / a["tokens_per_s"])
    # the printed table: the B/A line is the quotient of the printed medians (to their printed digits)
    rows = {ln.split()[0]: ln.split() for ln in out.splitlines() if re.match(r"(A|B|B/A) ", ln)}
    ms_a, ms_b = float(rows["A"][1]), float(rows["B"][1])
    # (tolerance: the printed digits: ms to 0.05, tokens/s to 0.5, the ratio to 0.0005)
    q = ms_b / ms_a
    assert float(rows["B/A"][1].rstrip("x")) == pytest.approx(q, abs=q * (0.05 / ms_a + 0.05 / ms_b) + 6e-4)
    tok_a, tok_b = (float(rows[k][2].replace(",", "")) for k in "AB")
    q = tok_b / tok_a
    assert float(rows["B/A"][2].rstrip("x")) == pytest.approx(q, abs=q * (0.5 / tok_a + 0.5 / tok_b) + 6e-4)
    assert out.splitlines()[-2].endswith("train.micro_batch=2 train.lr=1e-3")


def test_sweep_on_cpu_fits_the_micro_batch_to_max_memory(tmp_path, capsys, char_data):
    tiny = [*TINY[:-1], "--model.block_size=256"]  # activations large enough to tell micro-batches apart
    bench(capsys, char_data, "--sweep", "--sweep-grid", "none", "--micro-batch", "32", "--max-memory", "100GiB",
          "--json", str(tmp_path / "loose.json"), "--", *tiny)
    loose = json.loads((tmp_path / "loose.json").read_text())
    assert loose["micro_batch"] == 32 and len(loose["tries"]) == 1
    peak32 = loose["tries"][0]["peak_memory_bytes"]
    limit = peak32 - 48 * 2**20  # VmHWM here: 32 peaks ~436 MiB, 16 ~380 MiB, one setting within ~10 MiB
    out = bench(capsys, char_data, "--sweep", "--sweep-grid", "none", "--micro-batch", "32", "--max-memory",
                str(limit), "--json", str(tmp_path / "tight.json"), "--", *tiny)
    tight = json.loads((tmp_path / "tight.json").read_text())
    assert tight["micro_batch"] < 32 and tight["best"]["micro_batch"] == tight["micro_batch"]
    for t in tight["tries"]:  # every try was judged by its own peak against the limit
        assert t["over_limit"] == (t["peak_memory_bytes"] > limit)
    assert [t["micro_batch"] for t in tight["tries"]] == [32 >> i for i in range(len(tight["tries"]))]
    assert f"--micro-batch {tight['micro_batch']} " in out and f"--train.micro_batch={tight['micro_batch']}" in out


def test_schedule_sizes_settings_and_errors(capsys):
    assert schedule(3) == [("A", 1), ("B", 1), ("B", 2), ("A", 2), ("A", 3), ("B", 3)]
    assert parse_size("1.5GiB") == 1.5 * 2**30 and parse_size("800MB") == 800e6 and parse_size("2e9") == 2e9
    with pytest.raises(UserError, match="--max-memory '1.5 parsecs'"):
        parse_size("1.5 parsecs")
    assert setting_args(" --train.precision=bf16 train.compile=true") == ["--train.precision=bf16",
                                                                          "--train.compile=true"]
    assert main(["bench", "--sweep", "--sweep-grid", "compile,speed"]) == 2
    assert "--sweep-grid: unknown speed; choose from compile, checkpointing, precision or none" in \
        capsys.readouterr().err
    assert main(["bench", "--single", "--nodes", "2"]) == 2
    assert "leave --nodes at 1" in capsys.readouterr().err
