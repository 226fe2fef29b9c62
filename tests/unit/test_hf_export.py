"""export-hf / HF import / --init-from: logits equal to transformers', exact round trips, clear errors."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from gptforge.data.tokenizer import EOS, IM_END, IM_START, PAD, train_bpe  # noqa: E402
from gptforge.errors import UserError  # noqa: E402
from gptforge.model.gpt import GPTConfig, build_model  # noqa: E402
from gptforge.cli import main as cli_main  # noqa: E402
from gptforge.hf.export import export_hf, export_model  # noqa: E402
from gptforge.hf.load import hf_tokenizer  # noqa: E402
from gptforge.hf.init_from import init_model_config, init_tokenizer, load_init_weights  # noqa: E402
from gptforge.parallel.mesh import DistEnv  # noqa: E402
from gptforge.checkpoint import save_checkpoint  # noqa: E402

TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEXT = "the quick brown fox jumps over the lazy dog; 快速的棕色狐狸 "
VOCAB = 320  # model vocab (padded); the tokenizer has 300

# (arch, n_kv_head, bias, tie)
CASES = {"gpt2": ("gpt2", 4, True, True), "gpt2-untied": ("gpt2", 4, True, False),
         "llama-gqa": ("llama", 2, False, False), "llama-tied-bias": ("llama", 4, True, True)}


@pytest.fixture(scope="module")
def tok():
    return train_bpe([TEXT * 3] * 40, 300)


def small_cfg(arch, kv, bias, tie) -> GPTConfig:
    return GPTConfig(arch=arch, vocab_size=VOCAB, block_size=32, n_layer=2, n_head=4, n_kv_head=kv, d_model=64,
                     d_ff=96, bias=bias, tie_embeddings=tie, norm_eps=1e-5, rope_theta=5000.0)


def make_checkpoint(out_dir: Path, cfg: GPTConfig, tok, template: str | None = None, seed: int = 1):
    model = build_model(cfg, seed=seed).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a mix-up of them shows
        for n, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape) * 0.1)
    with tempfile.TemporaryDirectory() as d:
        tok.save(d)
        files = {f.name: f.read_bytes() for f in Path(d).iterdir()}
    files["model_config.json"] = json.dumps(cfg.to_dict())
    files["config.json"] = json.dumps({"model": {"preset": "test"}})
    if template is not None:
        files["chat_template.jinja"] = template
    ck = save_checkpoint(out_dir, 7, model, None, {"step": 7}, DistEnv(), files)
    return model, ck


def import_hf(folder: Path):
    """A Hugging Face folder -> (our model, its config, our tokenizer or None), as --init-from reads it."""
    cfg = init_model_config(folder)
    model = build_model(cfg).eval()
    load_init_weights(folder, model)
    return model, cfg, hf_tokenizer(folder)


def max_diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("case", list(CASES))
def test_export_matches_transformers_and_round_trips(tmp_path, tok, case):
    arch, kv, bias, tie = CASES[case]
    cfg = small_cfg(arch, kv, bias, tie)
    ours, ck = make_checkpoint(tmp_path / "run", cfg, tok, TEMPLATE)
    out = export_hf(tmp_path / "run", tmp_path / "hf")  # a run dir -> its latest checkpoint
    conf = json.loads((out / "config.json").read_text())
    V = tok.vocab_size  # the padded rows (VOCAB - V) are no token's: export leaves them out
    assert conf["vocab_size"] == V and conf["tie_word_embeddings"] == tie
    assert conf["eos_token_id"] == tok.eos_id and conf["pad_token_id"] == tok.pad_id
    cls = transformers.GPT2LMHeadModel if arch == "gpt2" else transformers.LlamaForCausalLM
    hf = cls.from_pretrained(out).eval()
    auto = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(auto) is cls and hf.dtype == torch.float32
    x = torch.randint(0, V, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = ours(x)[..., :V]
        d_hf, d_auto = max_diff(hf(x).logits, ref), max_diff(auto(x).logits, ref)
    assert d_hf < 1e-4 and d_auto < 1e-4, (d_hf, d_auto)

    # round trip: export -> import gives exactly the same model
    back, bcfg, btok = import_hf(out)
    unused = {"rope_theta"} if arch == "gpt2" else set()  # GPT-2 has no RoPE
    assert {k: v for k, v in bcfg.to_dict().items() if k not in unused} == \
        {k: v for k, v in cfg.complete().to_dict().items() if k not in unused}
    with torch.no_grad():
        assert torch.equal(back(x)[..., :V], ref)
    assert btok.encode(TEXT + IM_START + EOS) == tok.encode(TEXT + IM_START + EOS)


def test_tokenizer_loads_in_transformers_with_specials_and_template(tmp_path, tok):
    make_checkpoint(tmp_path / "run", small_cfg("llama", 2, False, False), tok, TEMPLATE)
    out = export_hf(tmp_path / "run", tmp_path / "hf")
    ht = transformers.AutoTokenizer.from_pretrained(out)
    assert isinstance(ht, transformers.PreTrainedTokenizerFast)
    assert ht.eos_token == EOS and ht.eos_token_id == tok.eos_id
    assert ht.pad_token == PAD and ht.pad_token_id == tok.pad_id
    for s in (TEXT, f"{IM_START}user\nhi{IM_END}\n{EOS}", "  spaces\n\nand 中文 ✓"):
        assert ht(s)["input_ids"] == tok.encode(s), s
        assert ht.decode(tok.encode(s)) == tok.decode(tok.encode(s))
    msgs = [{"role": "user", "content": "hi"}]
    text = ht.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == f"{IM_START}user\nhi{IM_END}\n{IM_START}assistant\n"
    batch = ht(["a", "a b c"], padding=True)
    assert tok.pad_id in batch["input_ids"][0] and tok.pad_id not in batch["input_ids"][1]


def test_export_cli_bf16_and_shards(tmp_path, tok):
    cfg = small_cfg("llama", 2, False, False)
    ours, ck = make_checkpoint(tmp_path / "run", cfg, tok)
    out = tmp_path / "hf16"
    assert cli_main(["export-hf", "--checkpoint", str(ck), "--out", str(out), "--dtype", "bf16",
                     "--max-shard-gb", str(40_000 / 1024**3)]) == 0
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("model-*.safetensors"))) > 1
    assert not list(out.glob("*.bin")) and not (out / "model.safetensors").exists()
    tcfg = json.loads((out / "tokenizer_config.json").read_text())
    assert "chat_template" not in tcfg  # none in this checkpoint
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert hf.dtype == torch.bfloat16
    back, _, _ = import_hf(out)  # sharded import, upcast to fp32
    V = tok.vocab_size
    x = torch.randint(0, V, (1, 16))
    with torch.no_grad():
        assert max_diff(back(x)[..., :V], hf(x).logits) < 0.1
        sd = ours.state_dict()
        for k, v in back.state_dict().items():  # the vocabulary's rows: the tokenizer's only (padding dropped)
            n = V if k in ("tok_emb.weight", "lm_head.weight") else len(v)
            assert torch.equal(v[:n], sd[k][:n].to(torch.bfloat16).float()), k


def _hf_random(kind: str, path: Path):
    torch.manual_seed(0)
    if kind == "gpt2":  # distilgpt2 shape, scaled down: GPT2LMHeadModel, tied
        conf = transformers.GPT2Config(vocab_size=101, n_positions=40, n_embd=48, n_layer=3, n_head=4,
                                       layer_norm_epsilon=1e-5, bos_token_id=0, eos_token_id=0)
        model = transformers.GPT2LMHeadModel(conf)
    elif kind == "llama":  # TinyLlama shape, scaled down: GQA, untied
        conf = transformers.LlamaConfig(vocab_size=103, hidden_size=64, intermediate_size=88, num_hidden_layers=2,
                                        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=48,
                                        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
        model = transformers.LlamaForCausalLM(conf)
    else:  # Qwen3: Llama + q/k norms; tied as the small Qwen3 models
        conf = transformers.Qwen3Config(vocab_size=103, hidden_size=64, intermediate_size=88, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                        max_position_embeddings=48, rms_norm_eps=1e-6, rope_theta=1e6,
                                        tie_word_embeddings=True)
        model = transformers.Qwen3ForCausalLM(conf)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape) * 0.1)
    model.eval().save_pretrained(path, safe_serialization=True)
    return model


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen3"])
def test_import_model_made_by_transformers(tmp_path, kind):
    hf = _hf_random(kind, tmp_path / "hf")
    ours, cfg, tok = import_hf(tmp_path / "hf")
    assert tok is None and cfg.arch == {"qwen3": "llama"}.get(kind, kind) and cfg.qk_norm == (kind == "qwen3")
    V = hf.config.vocab_size  # ours is padded to a multiple of 64
    x = torch.randint(0, V, (2, 30))
    with torch.no_grad():
        d = max_diff(ours(x)[..., :V], hf(x).logits)
    assert d < 1e-4, d


def test_import_hub_style_gpt2_keys_without_prefix(tmp_path):
    """The hub's gpt2/distilgpt2 store 'h.0.attn.c_attn.weight' (no 'transformer.') plus attn.bias buffers."""
    from safetensors.torch import load_file, save_file

    hf = _hf_random("gpt2", tmp_path / "hf")
    f = tmp_path / "hf" / "model.safetensors"
    sd = {k.removeprefix("transformer."): v for k, v in load_file(f).items()}
    sd["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 40, 40))
    save_file(sd, str(f), metadata={"format": "pt"})
    ours, _, _ = import_hf(tmp_path / "hf")
    x = torch.randint(0, 101, (1, 20))
    with torch.no_grad():
        assert max_diff(ours(x)[..., :101], hf(x).logits) < 1e-4


def test_init_from_hf_pads_vocab_and_keeps_logits(tmp_path, tok):
    cfg = small_cfg("gpt2", 4, True, True)
    ours, _ = make_checkpoint(tmp_path / "run", cfg, tok)
    # an HF folder whose vocab is exactly the tokenizer's (unpadded, like gpt2's 50257)
    small = GPTConfig(**(cfg.to_dict() | {"vocab_size": tok.vocab_size}))
    m = build_model(small, seed=2).eval()
    out = export_model(m, small, tmp_path / "hf", tokenizer_dir=tmp_path / "run" / "checkpoints" / "step_0000007")
    icfg = init_model_config(out)
    assert icfg.vocab_size % 64 == 0 and icfg.vocab_size >= tok.vocab_size
    model = build_model(icfg, seed=5).eval()
    load_init_weights(out, model)
    x = torch.randint(0, tok.vocab_size, (2, 16))
    with torch.no_grad():
        assert max_diff(model(x)[..., : tok.vocab_size], m(x)) == 0
        extra = model.tok_emb.weight[tok.vocab_size:]
        assert torch.allclose(extra, m.tok_emb.weight.mean(0).expand_as(extra))
    t2 = init_tokenizer(out)
    assert t2.encode(TEXT) == tok.encode(TEXT) and t2.eos_id == tok.eos_id


def test_init_from_gptforge_checkpoint(tmp_path, tok):
    cfg = small_cfg("llama", 2, False, False)
    ours, ck = make_checkpoint(tmp_path / "run", cfg, tok)
    assert init_model_config(tmp_path / "run") == cfg
    model = build_model(cfg, seed=9).eval()
    load_init_weights(tmp_path / "run", model)
    x = torch.randint(0, VOCAB, (1, 10))
    with torch.no_grad():
        assert torch.equal(model(x), ours(x))
    assert init_tokenizer(ck).encode(TEXT) == tok.encode(TEXT)


# ---- errors -------------------------------------------------------------------------------------
def test_errors_bad_checkpoint_and_unexportable(tmp_path, tok):
    with pytest.raises(UserError, match="does not exist"):
        export_hf(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no complete checkpoint"):
        export_hf(tmp_path / "empty", tmp_path / "out")
    _, ck = make_checkpoint(tmp_path / "nobias", small_cfg("gpt2", 4, False, True), tok)
    with pytest.raises(UserError, match="bias"):
        export_hf(ck, tmp_path / "out")
    _, ck = make_checkpoint(tmp_path / "gqa", small_cfg("gpt2", 2, True, True), tok)
    with pytest.raises(UserError, match="grouped-query"):
        export_hf(ck, tmp_path / "out")
    with pytest.raises(UserError, match="inside the checkpoint"):
        export_hf(ck, ck / "hf")
    (ck / "model_config.json").write_text("{not json")
    with pytest.raises(UserError, match="corrupt"):
        export_hf(ck, tmp_path / "out")
    _, ck = make_checkpoint(tmp_path / "trunc", small_cfg("llama", 2, False, False), tok)
    for f in ck.glob("*.distcp"):
        f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(UserError, match="corrupt or truncated"):
        export_hf(ck, tmp_path / "out")
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_errors_import(tmp_path):
    _hf_random("gpt2", tmp_path / "hf")
    # a pickle-only folder is refused and the message names safetensors
    (tmp_path / "hf" / "model.safetensors").rename(tmp_path / "hf" / "pytorch_model.bin")
    with pytest.raises(UserError, match="safetensors"):
        import_hf(tmp_path / "hf")
    with pytest.raises(UserError, match="safetensors"):
        load_init_weights(tmp_path / "hf", build_model(small_cfg("gpt2", 4, True, True)))
    conf = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps(conf | {"model_type": "bert"}))
    with pytest.raises(UserError, match="unsupported Hugging Face model_type 'bert'"):
        import_hf(tmp_path / "hf")
    with pytest.raises(UserError, match="unsupported Hugging Face model_type"):
        init_model_config(tmp_path / "hf")
    with pytest.raises(UserError, match="does not exist"):
        import_hf(tmp_path / "missing")
    with pytest.raises(UserError, match="does not exist"):
        init_model_config(tmp_path / "missing")
    # weights that do not fit the config
    _hf_random("llama", tmp_path / "ll")
    conf = json.loads((tmp_path / "ll" / "config.json").read_text())
    (tmp_path / "ll" / "config.json").write_text(json.dumps(conf | {"num_hidden_layers": 3}))
    with pytest.raises(UserError, match="do not match"):
        import_hf(tmp_path / "ll")


# ---- the block options: Qwen3 export, refusals ----------------------------------------------------
def _trained(cfg: GPTConfig, tok, steps: int = 60):
    """A model that has learnt TEXT a little, so its greedy continuation is text, not near-ties."""
    torch.manual_seed(0)
    model = build_model(cfg, seed=3)
    ids = torch.tensor(tok.encode(TEXT * 4))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        s = torch.randint(0, len(ids) - 25, (8,), generator=g)
        x = torch.stack([ids[i:i + 24] for i in s])
        y = torch.stack([ids[i + 1:i + 25] for i in s])
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), loss.item()


@pytest.mark.parametrize("tie", [False, True])
def test_qwen3_export_matches_transformers_logits_and_greedy_text(tmp_path, tok, tie):
    """arch llama + qk_norm (+ GQA, no bias, zero-initialised projections) is Qwen3's layout: exported as
    Qwen3ForCausalLM, transformers' logits and greedy text equal ours; it reads back as the same model."""
    from gptforge.model.engine import Engine, Params

    cfg = GPTConfig(**(small_cfg("llama", 2, False, tie).to_dict() | {"qk_norm": True, "zero_init_proj": True}))
    ours, loss = _trained(cfg, tok)
    assert loss < 2.0, loss
    with torch.no_grad():  # q/k gains away from 1, so a missing or swapped norm shows
        for n, p in ours.named_parameters():
            if "q_norm" in n or "k_norm" in n:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))))
    with tempfile.TemporaryDirectory() as d:
        tok.save(d)
        out = export_model(ours, cfg.complete(), tmp_path / "hf", tokenizer_dir=d)
    conf = json.loads((out / "config.json").read_text())
    assert conf["model_type"] == "qwen3" and conf["architectures"] == ["Qwen3ForCausalLM"]
    assert (conf["head_dim"], conf["rms_norm_eps"], conf["rope_theta"], conf["tie_word_embeddings"]) == \
        (16, 1e-5, 5000.0, tie)
    assert conf["attention_bias"] is False and conf["use_sliding_window"] is False and conf["sliding_window"] is None
    assert conf["num_key_value_heads"] == 2
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf) is transformers.Qwen3ForCausalLM
    assert hf.model.layers[0].self_attn.q_norm.weight.shape == (16,)
    V = tok.vocab_size  # export leaves out the padded rows
    x = torch.randint(0, V, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = ours(x)[..., :V]
        d = max_diff(hf(x).logits, ref)
    assert d < 1e-5, d

    prompt = tok.encode("the quick brown")
    mine = Engine(ours, tok).run(prompt, Params(16, 0.0, stop_ids=frozenset({tok.eos_id}))).ids
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=16,
                             pad_token_id=tok.pad_id)[0, len(prompt):].tolist()
    assert mine == theirs and len(mine) == 16
    text = tok.decode(mine)
    assert text == tok.decode(theirs) and "fox" in text, text  # it learnt the text: real words, not ties

    back, bcfg, _ = import_hf(out)  # Qwen3 folder -> ours: the same model (init is not recorded)
    assert bcfg.qk_norm and bcfg.arch == "llama"
    assert {k: v for k, v in bcfg.to_dict().items() if k != "zero_init_proj"} == \
        {k: v for k, v in cfg.complete().to_dict().items() if k != "zero_init_proj"}
    with torch.no_grad():
        assert torch.equal(back(x)[..., :V], ref)


@pytest.mark.parametrize("arch,opts,key", [
    ("llama", {"logit_softcap": 30.0}, "model.logit_softcap"),
    ("gpt2", {"logit_softcap": 15.0}, "model.logit_softcap"),
    ("llama", {"mlp_act": "relu2"}, "model.mlp_act"),
    ("llama", {"mlp_act": "gelu"}, "model.mlp_act"),
    ("gpt2", {"mlp_act": "relu2"}, "model.mlp_act"),
    ("gpt2", {"mlp_act": "swiglu"}, "model.mlp_act"),
    ("gpt2", {"qk_norm": True}, "model.qk_norm"),
    ("llama", {"qk_norm": True, "bias": True}, "model.qk_norm"),
])
def test_options_without_a_transformers_equivalent_refuse_export(tmp_path, tok, arch, opts, key):
    from gptforge.hf.mapping import check_exportable

    cfg = GPTConfig(**(small_cfg(arch, 4, arch == "gpt2", True).to_dict() | opts)).complete()
    with pytest.raises(UserError, match=key.replace(".", r"\.")) as e:
        check_exportable(cfg)
    assert "\n" not in str(e.value)
    _, ck = make_checkpoint(tmp_path / "run", cfg, tok)
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        export_hf(ck, tmp_path / "out")
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_zero_init_and_explicit_default_activation_export(tmp_path, tok):
    """zero_init_proj is only an initialisation; mlp_act set to the arch's own activation is the same model."""
    for arch, act in (("gpt2", "gelu"), ("llama", "swiglu")):
        cfg = GPTConfig(**(small_cfg(arch, 4, arch == "gpt2", False).to_dict()
                           | {"zero_init_proj": True, "mlp_act": act}))
        ours, _ = make_checkpoint(tmp_path / arch, cfg, tok)
        out = export_hf(tmp_path / arch, tmp_path / f"hf-{arch}")
        hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
        x = torch.randint(0, tok.vocab_size, (1, 12))
        with torch.no_grad():
            assert max_diff(hf(x).logits, ours(x)[..., :tok.vocab_size]) < 1e-5


def test_qwen3_import_refusals():
    from gptforge.hf.mapping import gpt_config_from_hf

    base = {"model_type": "qwen3", "vocab_size": 64, "hidden_size": 64, "intermediate_size": 96,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}
    assert gpt_config_from_hf(base).qk_norm
    for extra, words in (({"head_dim": 128}, "head_dim=128"), ({"attention_bias": True}, "attention_bias"),
                         ({"use_sliding_window": True}, "sliding_window")):
        with pytest.raises(UserError, match=words):
            gpt_config_from_hf(base | extra)
