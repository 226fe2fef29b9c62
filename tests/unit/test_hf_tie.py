"""A Hugging Face folder's output head is read as transformers reads it: tie_word_embeddings absent from config.json
takes the config class's own default (Llama and Qwen3 untied, GPT-2 tied), an untied head is loaded, and a folder
that says tied but holds a different lm_head.weight is refused instead of silently dropping it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from gptforge.errors import UserError  # noqa: E402
from gptforge.hf.init_from import init_model_config, load_init_weights  # noqa: E402
from gptforge.hf.mapping import TIE_DEFAULT  # noqa: E402
from gptforge.model.gpt import build_model  # noqa: E402

V = 97  # not a multiple of 64: ours is padded, the extra logits are cut off before comparing


def _randomise(model) -> None:
    """Weights with non-trivial norms and biases, so a mix-up of any tensor (above all the head) shows."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # norm gains around 1, biases around 0
                p.copy_((0.0 if name.endswith("bias") else 1.0) + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def _save(kind: str, folder: Path, tie: bool | None):
    """A tiny model built and saved by transformers; tie None: config.json without tie_word_embeddings."""
    torch.manual_seed(0)
    common = dict(vocab_size=V, initializer_range=0.1, **({} if tie is None else {"tie_word_embeddings": tie}))
    if kind == "gpt2":
        conf = transformers.GPT2Config(n_positions=32, n_embd=48, n_layer=2, n_head=4, layer_norm_epsilon=1e-5,
                                       bos_token_id=0, eos_token_id=0, **common)
        model = transformers.GPT2LMHeadModel(conf)
    elif kind == "llama":  # biases everywhere, GQA
        conf = transformers.LlamaConfig(hidden_size=64, intermediate_size=88, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                        rms_norm_eps=1e-5, attention_bias=True, mlp_bias=True, **common)
        model = transformers.LlamaForCausalLM(conf)
    else:
        conf = transformers.Qwen3Config(hidden_size=64, intermediate_size=88, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                        max_position_embeddings=32, rms_norm_eps=1e-6, **common)
        model = transformers.Qwen3ForCausalLM(conf)
    _randomise(model)
    model.eval().save_pretrained(folder, safe_serialization=True)
    if tie is None:  # as many config.json files on the hub: the key left to the class default
        f = folder / "config.json"
        f.write_text(json.dumps({k: v for k, v in json.loads(f.read_text()).items() if k != "tie_word_embeddings"}))
    return model


def _ours(folder: Path):
    """The folder as --init-from, generate, serve and eval read it."""
    cfg = init_model_config(folder)
    model = build_model(cfg, seed=7).eval()
    load_init_weights(folder, model)
    return model, cfg


def _diff(ours, theirs) -> float:
    x = torch.randint(0, V, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return (ours(x)[..., :V] - theirs(x).logits).abs().max().item()


def test_tie_defaults_are_transformers_own():
    for model_type, tie in TIE_DEFAULT.items():
        assert transformers.AutoConfig.for_model(model_type).tie_word_embeddings is tie, model_type


@pytest.mark.parametrize("kind,tie,want", [
    ("llama", None, False),  # (a) Llama without the key: untied, its own head
    ("qwen3", None, False),
    ("llama", True, True),   # (b) explicitly tied
    ("llama", False, False),
    ("gpt2", None, True),    # (c) GPT-2's default: tied
    ("gpt2", False, False),
])
def test_head_read_as_transformers_reads_it(tmp_path, kind, tie, want):
    built = _save(kind, tmp_path / "hf", tie)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()  # the folder, read back
    assert theirs.config.tie_word_embeddings is want
    head, emb = theirs.get_output_embeddings().weight, theirs.get_input_embeddings().weight
    assert (head.data_ptr() == emb.data_ptr()) is want  # transformers itself ties exactly when `want`
    ours, cfg = _ours(tmp_path / "hf")
    assert cfg.tie_embeddings is want
    d, d_built = _diff(ours, theirs), _diff(ours, built)
    print(f"{kind} tie={tie}: max |logit diff| vs transformers {d:.2e}")
    assert d < 1e-5 and d_built < 1e-5, (d, d_built)
    if not want:  # the head is the folder's own, not a copy of the embedding
        assert not torch.equal(ours.lm_head.weight[:V], ours.tok_emb.weight[:V])


def test_tied_folder_storing_an_equal_head_loads(tmp_path):
    """Some tied checkpoints store lm_head.weight anyway: equal to the embedding, it is accepted."""
    from safetensors.torch import load_file, save_file

    built = _save("llama", tmp_path / "hf", True)
    f = tmp_path / "hf" / "model.safetensors"
    sd = load_file(f)
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    save_file(sd, str(f), metadata={"format": "pt"})
    ours, _ = _ours(tmp_path / "hf")
    assert _diff(ours, built) < 1e-5


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_tied_config_with_a_different_head_is_refused(tmp_path, kind):
    """config.json says tied, the weights hold their own lm_head.weight: refused in one line, never dropped."""
    _save(kind, tmp_path / "hf", False)
    f = tmp_path / "hf" / "config.json"
    f.write_text(json.dumps(json.loads(f.read_text()) | {"tie_word_embeddings": True}))
    with pytest.raises(UserError, match="lm_head.weight that differs from the embedding") as e:
        _ours(tmp_path / "hf")
    assert "\n" not in str(e.value) and "tie_word_embeddings" in str(e.value)


def test_untied_config_without_a_head_is_refused(tmp_path):
    """A Llama folder without the key (untied) whose weights have no lm_head.weight: refused, naming the key."""
    _save("llama", tmp_path / "hf", True)  # tied: no lm_head.weight saved
    f = tmp_path / "hf" / "config.json"
    f.write_text(json.dumps({k: v for k, v in json.loads(f.read_text()).items() if k != "tie_word_embeddings"}))
    with pytest.raises(UserError, match="lack lm_head.weight.*tie_word_embeddings") as e:
        _ours(tmp_path / "hf")
    assert "\n" not in str(e.value)
