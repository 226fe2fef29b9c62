"""scripts/bench_nanogpt.py without nanoGPT: the token files both sides get (the same ids), the curve made from
nanoGPT's log (evaluation time left out), and the train.py arguments of a recipe."""

from __future__ import annotations

import importlib.util
import json
import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bn():
    spec = importlib.util.spec_from_file_location("bench_nanogpt", ROOT / "scripts" / "bench_nanogpt.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_both_sides_get_the_same_token_ids(bn, tmp_path, shakespeare_small):
    from gptforge.data.tokenizer import load_tokenizer

    text = shakespeare_small.read_text(encoding="utf-8")[:40_000]
    nano = tmp_path / "nanogpt" / "data" / "case"
    out = bn.prepare_tokens([text], "char", 0.1, None, tmp_path / "work", nano)
    gf = Path(out["gptforge_data"])
    assert (nano / "train.bin").read_bytes() == (gf / "train.bin").read_bytes()
    train_text, val_text = bn.split([text], 0.1, None)
    assert train_text[0] + val_text[0] == text and abs(len(val_text[0]) - 4000) < 200  # the tail, cut at a newline
    tok = load_tokenizer(gf)
    ids = np.fromfile(nano / "val.bin", dtype=np.uint16)
    assert ids[0] == tok.eos_id and tok.decode(ids[1:].tolist()) == val_text[0]  # what data.val_path scores
    assert tok.decode(np.fromfile(nano / "train.bin", dtype=np.uint16)[:-1].tolist()) == train_text[0]
    meta = pickle.loads((nano / "meta.pkl").read_bytes())
    assert meta["vocab_size"] == out["model_vocab"] == 64 * -(-tok.vocab_size // 64)
    assert Path(out["val_file"]).read_text(encoding="utf-8") == val_text[0]


def test_the_validation_set_is_prepared_where_the_timed_run_looks(bn, tmp_path, shakespeare_small, monkeypatch):
    """The run of gptforge finds data.val_path prepared in its cache (GPTFORGE_CACHE), as nanoGPT finds its
    val.bin: tokenizing it inside the timed run would add that work to its peak memory."""
    from gptforge.data import prepare as P

    monkeypatch.setenv("GPTFORGE_CACHE", str(tmp_path / "cache"))  # a cold cache: the check can fail
    text = shakespeare_small.read_text(encoding="utf-8")[:30_000]
    out = bn.prepare_tokens([text], "char", 0.1, None, tmp_path / "work", tmp_path / "nano")

    def refuse(*a, **k):
        raise AssertionError("the validation set was prepared again")
    monkeypatch.setattr(P, "prepare", refuse)
    val_dir = P.ensure_val_prepared(out["val_file"], out["gptforge_data"], progress=False)
    assert (val_dir / "val.bin").read_bytes() == (tmp_path / "nano" / "val.bin").read_bytes()


def test_many_documents_split_at_a_document(bn):
    docs = [f"doc {i} " + "x" * 90 for i in range(20)]
    train, val = bn.split(docs, 0.1, None)
    assert (len(train), len(val)) == (18, 2) and train + val == docs
    train, val = bn.split(docs, 0.1, 500)  # --max-chars: the first 500 characters
    assert sum(map(len, train + val)) == 500


LOG = """\
step 0: train loss 4.2000, val loss 4.2100
iter 0: loss 4.1000, time 9000.00ms, mfu -100.00%
iter 1: loss 3.9000, time 100.00ms, mfu -100.00%
iter 2: loss 3.8000, time 100.00ms, mfu -100.00%
iter 3: loss 3.7000, time 200.00ms, mfu -100.00%
iter 4: loss 3.6000, time 100.00ms, mfu -100.00%
step 5: train loss 3.5000, val loss 3.5500
saving checkpoint to out
iter 5: loss 3.5000, time 7000.00ms, mfu 0.01%
iter 6: loss 3.4000, time 100.00ms, mfu 0.01%
iter 7: loss 3.3000, time 100.00ms, mfu 0.01%
iter 8: loss 3.2000, time 100.00ms, mfu 0.01%
iter 9: loss 3.1000, time 100.00ms, mfu 0.01%
step 10: train loss 3.0000, val loss 3.0500
iter 10: loss 3.0000, time 8000.00ms, mfu 0.01%
bench_nanogpt peak_rss_bytes 123456789
"""


def test_the_curve_leaves_evaluations_out(bn):
    got = bn.parse_log(LOG, 1000, 5)
    # iterations 0, 5 and 10 evaluated first: each counts as the median of its ten nearest plain ones (100 ms)
    want = [[0, 0.0, 4.21], [5000, 0.1 + 0.1 + 0.1 + 0.2 + 0.1, 3.55], [10000, 0.6 + 0.1 + 4 * 0.1, 3.05]]
    assert [[t, round(s, 9), v] for t, s, v in got["val_curve"]] == [[t, round(s, 9), v] for t, s, v in want]
    assert got["peak_memory_bytes"] == 123456789 and got["iterations"] == 11


def test_train_py_arguments(bn, tmp_path):
    cfg = tmp_path / "config" / "train_shakespeare_char.py"
    cfg.parent.mkdir()
    cfg.write_text("batch_size = 64\nblock_size = 256 # context\ngradient_accumulation_steps = 1\nmax_iters = 5000\n"
                   "eval_interval = 250 # keep frequent\nn_layer = 6\nlearning_rate = 1e-3\n")
    a = SimpleNamespace(max_iters=None, eval_interval=None, eval_iters=3, dataset_name="gf", work=tmp_path,
                        nanogpt_device="cpu", dtype="float32")
    args, eff = bn.nanogpt_recipe(bn.CASES["shakespeare-char"], a, tmp_path)
    assert args[0] == "config/train_shakespeare_char.py"
    for want in ("--compile=False", "--device=cpu", "--dtype=float32", "--log_interval=1", "--eval_iters=3",
                 "--gradient_accumulation_steps=1", "--dataset=gf"):
        assert want in args
    assert (eff["batch_size"], eff["block_size"], eff["max_iters"], eff["eval_interval"]) == (64, 256, 5000, 250)
    a.max_iters = 20
    args, eff = bn.nanogpt_recipe(bn.CASES["english-gpt2"], a, tmp_path)  # no config file: all as overrides
    assert "--gradient_accumulation_steps=1" in args and "--max_iters=20" in args and "--lr_decay_iters=20" in args
    assert (eff["batch_size"], eff["block_size"], eff["eval_interval"], eff["n_layer"]) == (12, 1024, 5, 8)
    json.dumps(args)  # plain values only
