"""train.precision=auto on a CPU (gptforge.train.precision): the decision from measured timings, the timings'
cache (written once, read after, a broken file ignored and rewritten), and explicit precisions left alone.
No timing is asserted: the tests give the timings (a seeded cache) or only check where they went."""

from __future__ import annotations

import json
import math

import pytest
import torch

from gptforge.model.gpt import GPTConfig
from gptforge.parallel.mesh import DistEnv
from gptforge.train import precision as prec

TINY = GPTConfig(n_layer=2, n_head=2, d_model=32, d_ff=64, block_size=16, vocab_size=64).complete()
ENV = DistEnv(device=torch.device("cpu"))


@pytest.fixture(autouse=True)
def quiet(monkeypatch):
    """Timings are cached however busy the machine (CI's cores are shared); the noise rule has its own test."""
    monkeypatch.setattr(prec, "NOISE", math.inf)


def seed_cache(path, mcfg, micro_batch, fp32_s, bf16_s):
    entry = {"fp32_s": fp32_s, "bf16_s": bf16_s, "tokens": 64, "when": "2026-01-01"}
    path.write_text(json.dumps({"format": 1, "entries": {prec.cache_key(mcfg, micro_batch): entry}}))


@pytest.mark.parametrize("fp32_s, bf16_s, want, why", [
    (1.48, 1.0, "bf16", "auto: measured 1.48x faster than fp32 on this CPU for these shapes"),
    (1.0, 1 / 0.71, "fp32", "auto: bf16 measured 0.71x fp32's speed (slower) on this CPU for these shapes"),
    (1.03, 1.0, "fp32", "auto: bf16 measured only 1.03x fp32's speed on this CPU for these shapes (< 1.05x)"),
    (1.05, 1.0, "bf16", "auto: measured 1.05x faster than fp32 on this CPU for these shapes"),
    (1.0, math.inf, "fp32", "auto: this CPU has no native bf16"),
])
def test_decide_picks_the_faster_and_says_why(fp32_s, bf16_s, want, why):
    assert prec.decide(fp32_s, bf16_s) == (want, why)


def test_decide_names_the_slowest_node():
    assert prec.decide(2.0, 1.0, where="the slowest node") == (
        "bf16", "auto: measured 2.00x faster than fp32 on the slowest node for these shapes")


def test_measured_once_then_read_from_the_cache(tmp_path):
    path = tmp_path / "cpu_precision.json"
    before = prec.measurements
    torch.manual_seed(5)
    first, cached = prec.cached_timings(TINY, 2, path)
    assert not cached and prec.measurements == before + 1
    after_measuring = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(torch.rand(3), after_measuring)  # the measurement left the run's random stream alone
    entry = json.loads(path.read_text())["entries"][prec.cache_key(TINY, 2)]
    assert entry["fp32_s"] == first["fp32_s"] > 0 and entry["bf16_s"] == first["bf16_s"] > 0
    assert entry["tokens"] == 2 * 16
    second, cached = prec.cached_timings(TINY, 2, path)
    assert cached and prec.measurements == before + 1  # not measured again
    assert (second["fp32_s"], second["bf16_s"]) == (first["fp32_s"], first["bf16_s"])
    # another shape is another entry, measured and added beside the first
    _, cached = prec.cached_timings(TINY, 3, path)
    assert not cached and prec.measurements == before + 2
    assert len(json.loads(path.read_text())["entries"]) == 2


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"entries": 7}',
                                     '{"entries": {"KEY": {"fp32_s": "x", "bf16_s": 1}}}', ""])
def test_a_broken_cache_is_measured_again_and_rewritten(tmp_path, content):
    path = tmp_path / "cpu_precision.json"
    path.write_text(content.replace("KEY", prec.cache_key(TINY, 2)))
    before = prec.measurements
    timings, cached = prec.cached_timings(TINY, 2, path)
    assert not cached and prec.measurements == before + 1
    entry = json.loads(path.read_text())["entries"][prec.cache_key(TINY, 2)]  # valid JSON again
    assert entry["fp32_s"] == timings["fp32_s"]


def test_an_unwritable_cache_only_costs_a_measurement(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    path = blocker / "cpu_precision.json"  # its folder is a file: nothing can be written there
    before = prec.measurements
    p, why = prec.train_precision("auto", ENV, TINY, 2, cache_path=path, bf16_supported=True)
    assert p in ("fp32", "bf16") and why.startswith("auto: ") and "cached" not in why
    assert prec.measurements == before + 1 and not path.exists()


@pytest.mark.parametrize("fp32_s, bf16_s, want", [(3.0, 2.0, "bf16"), (2.0, 3.0, "fp32")])
def test_auto_follows_the_cached_timings(tmp_path, fp32_s, bf16_s, want):
    path = tmp_path / "cpu_precision.json"
    seed_cache(path, TINY, 4, fp32_s, bf16_s)
    before = prec.measurements
    p, why = prec.train_precision("auto", ENV, TINY, 4, cache_path=path, bf16_supported=True)
    assert (p, why) == (want, prec.decide(fp32_s, bf16_s)[1] + f"; cached in {path}")
    assert prec.measurements == before


@pytest.mark.parametrize("requested", ["fp32", "bf16"])
def test_an_explicit_precision_is_never_overridden(tmp_path, requested):
    path = tmp_path / "cpu_precision.json"
    seed_cache(path, TINY, 4, 3.0, 1.0) if requested == "fp32" else seed_cache(path, TINY, 4, 1.0, 3.0)
    before = prec.measurements
    assert prec.train_precision(requested, ENV, TINY, 4, cache_path=path, bf16_supported=True) == (requested, "")
    assert prec.measurements == before


def test_no_bf16_means_fp32_without_measuring(tmp_path):
    path = tmp_path / "cpu_precision.json"
    before = prec.measurements
    assert prec.train_precision("auto", ENV, TINY, 4, cache_path=path, bf16_supported=False) == (
        "fp32", "auto: this CPU has no native bf16")
    assert prec.measurements == before and not path.exists()


def test_the_measured_input_is_bounded():
    big = GPTConfig(n_layer=2, n_head=2, d_model=32, d_ff=64, block_size=8192, vocab_size=64).complete()
    assert prec._shape(TINY, 4, 4096) == (4, 16)
    assert prec._shape(TINY, 1000, 4096) == (256, 16)
    assert prec._shape(big, 4, 4096) == (1, 4096)


def test_noisy_timings_decide_the_run_but_are_not_cached(tmp_path, monkeypatch):
    monkeypatch.setattr(prec, "NOISE", -1.0)  # any spread counts as a busy machine
    path = tmp_path / "cpu_precision.json"
    before = prec.measurements
    p, why = prec.train_precision("auto", ENV, TINY, 2, cache_path=path, bf16_supported=True)
    assert p in ("fp32", "bf16") and why.endswith("apart), not cached") and "; the machine was busy (repeats " in why
    assert not path.exists()
    prec.train_precision("auto", ENV, TINY, 2, cache_path=path, bf16_supported=True)
    assert prec.measurements == before + 2  # measured again
