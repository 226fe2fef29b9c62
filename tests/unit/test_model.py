import pytest
import torch

from gptforge.config.presets import MODEL_PRESETS, preset_model
from gptforge.model.engine import Engine, Params
from gptforge.model.gpt import GPT, GPTConfig, build_model
from gptforge.model.kv_cache import SlotCache
from support.decode_reference import recompute_decode


EXPECTED_PARAMS = {"micro": 3.2e6, "nano": 10.7e6, "minimind": 25.8e6, "tiny": 51e6, "small": 124e6, "medium": 354e6,
                   "large": 773e6, "llama-1b": 1.1e9}


@pytest.mark.parametrize("name", list(MODEL_PRESETS))
def test_preset_parameter_counts_on_meta(name):
    with torch.device("meta"):
        model = GPT(preset_model(name, nominal_vocab=True))
    n = model.num_params()
    assert abs(n - EXPECTED_PARAMS[name]) / EXPECTED_PARAMS[name] < 0.02, (name, n)
    assert all(p.is_meta for p in model.parameters())  # nothing materialised


SMALL = dict(n_layer=2, n_head=4, d_model=64, d_ff=128, block_size=32, vocab_size=97)


@pytest.mark.parametrize("arch,kv", [("gpt2", 4), ("llama", 2), ("llama", 4)])
def test_kv_cache_greedy_equals_no_cache(arch, kv):
    """The engine's greedy tokens (KV cache; and recomputing, --no-cache) == a plain full-recompute argmax loop."""
    # init_std 0.2: at GPT-2's 0.02 an untrained model only repeats the prompt's last token
    model = build_model(GPTConfig(arch=arch, n_kv_head=kv, bias=arch == "gpt2", init_std=0.2, **SMALL), seed=3)
    prompt = [5, 17, 3, 42]
    a = Engine(model, None).run(prompt, Params(20, 0.0)).ids
    b = Engine(model, None, use_cache=False).run(prompt, Params(20, 0.0)).ids
    ref = recompute_decode(model, prompt, 20)
    assert a == b == ref and len(a) == 20 and len(set(a)) > 5  # not one token repeated


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_incremental_logits_match_full_forward(arch):
    model = build_model(GPTConfig(arch=arch, **SMALL), seed=1).eval()
    x = torch.randint(0, 97, (2, 12))
    full = model(x)
    cache = SlotCache(model, slots=2)

    def feed(chunk):
        pos, mask = cache.select([0, 1], chunk.shape[1])
        return model(chunk, kv_cache=cache, attn_mask=mask, positions=pos)

    parts = [feed(x[:, :5]), feed(x[:, 5:6]), feed(x[:, 6:])]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


def test_init_is_seeded_and_tied():
    a = build_model(GPTConfig(**SMALL), seed=7)
    b = build_model(GPTConfig(**SMALL), seed=7)
    for (na, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), na
    assert a.lm_head.weight is a.tok_emb.weight
    # residual projections get the smaller GPT-2 init
    std_o = a.layers["0"].attn.o_proj.weight.std().item()
    std_q = a.layers["0"].attn.q_proj.weight.std().item()
    assert std_o < std_q * 0.7


def test_causality():
    model = build_model(GPTConfig(arch="llama", **SMALL), seed=2).eval()
    x = torch.randint(0, 97, (1, 10))
    y = x.clone()
    y[0, 7] = (y[0, 7] + 1) % 97
    torch.testing.assert_close(model(x)[:, :7], model(y)[:, :7])
    assert not torch.allclose(model(x)[:, 7:], model(y)[:, 7:])


def test_context_overflow_is_clear():
    model = build_model(GPTConfig(**SMALL))
    with pytest.raises(ValueError, match="longer than the context"):
        model(torch.zeros(1, 33, dtype=torch.long))
