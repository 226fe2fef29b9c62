"""The one decode engine (gptforge.model.engine) against a plain loop that recomputes the whole sequence at
every step (tests/support/decode_reference.py): seeded sampling, stop ids, and the callers outside serve
(the end-of-training samples of train/recipes.py). Greedy decoding is checked in test_model.py and
test_model_options.py, batching and the server in test_serve.py."""

from __future__ import annotations

import pytest

from gptforge.config.schema import Config
from gptforge.data.chat_template import encode_chat, stop_ids
from gptforge.hf.inference import load_for_inference
from gptforge.model.engine import Engine, Params
from gptforge.model.gpt import GPTConfig, build_model
from gptforge.train.recipes import SFT, Pretrain
from gptforge.train.run import Loaders
from support.stage_fixtures import sft_reverse_run  # noqa: F401
from support.decode_reference import recompute_decode

SMALL = dict(n_layer=2, n_head=4, d_model=64, d_ff=128, block_size=32, vocab_size=97, init_std=0.2)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, None, None), (0.8, 20, None), (1.3, None, 0.9)])
def test_seeded_sample_is_reproducible_and_equals_the_reference(temperature, top_k, top_p):
    model = build_model(GPTConfig(arch="llama", n_kv_head=2, bias=False, **SMALL), seed=4)
    prompt = [7, 1, 30, 2, 64]
    params = Params(24, temperature, top_k, top_p, seed=21)
    a = Engine(model, None).run(prompt, params).ids
    b = Engine(model, None).run(prompt, params).ids  # a fresh engine, the same seed
    ref = recompute_decode(model, prompt, 24, temperature, top_k, top_p, seed=21)
    assert a == b == ref and len(a) == 24 and len(set(a)) > 8
    other = Engine(model, None).run(prompt, Params(24, temperature, top_k, top_p, seed=22)).ids
    assert other != a  # the seed matters
    # a stop id ends the sequence after it (counted), as the reference stops
    stop = a[10]
    r = Engine(model, None).run(prompt, Params(24, temperature, top_k, top_p, seed=21, stop_ids=frozenset({stop})))
    assert r.ids == a[:a.index(stop) + 1] and (r.finish_reason, r.n_new) == ("stop", a.index(stop) + 1)


def test_tiny_temperature_is_greedy():
    """Below model.sampling.GREEDY_BELOW the engine takes the argmax: logits / 1e-40 would overflow float32 into
    NaN probabilities (serve answered 500 for temperature 1e-40 before)."""
    model = build_model(GPTConfig(arch="gpt2", **SMALL), seed=5)
    prompt = [3, 9, 27]
    assert Engine(model, None).run(prompt, Params(16, 1e-40, seed=0)).ids == recompute_decode(model, prompt, 16)


def test_end_of_training_samples_go_through_the_engine(trained_run, sft_reverse_run):  # noqa: F811
    """train/recipes.py's samplers (pretrain: a continuation; SFT/DPO: the reply to one message) give the
    reference's text for the same settings: temperature 0.8 / 0.7, top_k 50, train.seed."""
    cfg = Config()
    cfg.train.sample_tokens, cfg.train.sample_prompt = 40, "ROMEO:"
    model, tok, _ = load_for_inference(str(trained_run), "cpu")
    text = Pretrain(cfg, None).sampler(tok, Loaders(None, None))(model)
    ref = recompute_decode(model, tok.encode("ROMEO:"), 40, 0.8, 50, None, cfg.train.seed, {tok.eos_id})
    assert text == "ROMEO:" + tok.decode([i for i in ref if i != tok.eos_id]) and len(text) > 20
    model, tok, _ = load_for_inference(str(sft_reverse_run), "cpu")
    cfg.train.sample_prompt = "bead"
    text = SFT(cfg, None).sampler(tok, Loaders(None, None))(model)
    ids, _ = encode_chat(tok, [{"role": "user", "content": "bead"}], add_generation_prompt=True)
    stops = stop_ids(tok)
    ref = recompute_decode(model, ids, 40, 0.7, 50, None, cfg.train.seed, stops)
    assert text == "user: bead\nassistant: " + tok.decode([i for i in ref if i not in stops])
    assert text.endswith("daeb")  # the reverse task, learnt
