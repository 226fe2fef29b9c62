"""export-gguf, read back with the `gguf` package's own reader (no llama.cpp here; tests/process/test_llama_cpp.py
runs the files in llama.cpp): metadata, tokenizer, tensor names, shapes and bytes, the refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from gptforge.cli import main as cli_main  # noqa: E402
from gptforge.data.chat_template import CHATML_JINJA  # noqa: E402
from gptforge.data.tokenizer import EOS, IM_END, PAD, UNK, char_tokenizer, load_tokenizer, train_bpe  # noqa: E402
from gptforge.errors import UserError  # noqa: E402
from gptforge.hf.gguf_export import _byte_level_table, _permute_rope, write_gguf  # noqa: E402
from gptforge.model.gpt import GPTConfig, build_model  # noqa: E402

TEXT = "the quick brown fox jumps over the lazy dog; it's 2024 ... naïve café 東京 "


@pytest.fixture(scope="module")
def bpe():
    return train_bpe([TEXT * 3] * 40, 300)


def model_of(arch="llama", vocab=320, **kw):
    cfg = GPTConfig(arch=arch, vocab_size=vocab, block_size=32, n_layer=2, n_head=4, d_model=64, d_ff=96, **kw)
    m = build_model(cfg, seed=3).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape) * 0.1)
    return m


def read(path):
    r = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    return fields, {t.name: t for t in r.tensors}


def test_llama_gqa_f32_metadata_and_exact_tensors(tmp_path, bpe):
    m = model_of("llama", n_kv_head=2, bias=True, tie_embeddings=False)
    f, t = read(write_gguf(m, m.cfg, bpe, tmp_path / "m.gguf", "f32", chat_template=CHATML_JINJA))
    V = bpe.vocab_size  # 300: the model's 320 rows are cut back to the tokenizer's
    assert (f["general.architecture"], f["tokenizer.ggml.model"], f["tokenizer.ggml.pre"]) == ("llama", "gpt2", "gpt-2")
    assert (f["llama.block_count"], f["llama.embedding_length"], f["llama.feed_forward_length"]) == (2, 64, 96)
    assert (f["llama.attention.head_count"], f["llama.attention.head_count_kv"]) == (4, 2)
    assert f["llama.context_length"] == 32
    assert f["llama.rope.dimension_count"] == 16 and f["llama.rope.freq_base"] == 10000.0
    assert f["llama.vocab_size"] == V and len(f["tokenizer.ggml.tokens"]) == V == len(f["tokenizer.ggml.token_type"])
    vocab = bpe.hf.get_vocab(with_added_tokens=True)
    word = max((w for w in vocab if not w.startswith("<|")), key=len)  # a merged byte-level token
    assert len(word) > 2 and f["tokenizer.ggml.tokens"][vocab[word]] == word
    assert f["tokenizer.ggml.eos_token_id"] == f["tokenizer.ggml.bos_token_id"] == vocab[EOS]
    assert f["tokenizer.ggml.eot_token_id"] == vocab[IM_END] and f["tokenizer.ggml.padding_token_id"] == vocab[PAD]
    assert f["tokenizer.ggml.add_bos_token"] is False and f["tokenizer.chat_template"] == CHATML_JINJA
    assert [f["tokenizer.ggml.token_type"][vocab[s]] for s in (EOS, IM_END, word)] == [3, 3, 1]  # control, normal
    assert len(f["tokenizer.ggml.merges"]) == V - 4 - 256  # every merge made one token
    sd = m.state_dict()
    assert len(t) == 3 + 2 * (2 + 4 + 3 + 4 + 3)  # embd, norm, output; per layer: norms, qkvo, mlp, 7 biases
    for ours, theirs in (("tok_emb.weight", "token_embd.weight"), ("lm_head.weight", "output.weight")):
        assert t[theirs].tensor_type == gguf.GGMLQuantizationType.F32
        assert list(t[theirs].shape) == [64, V]  # ggml order: (in, out)
        assert np.array_equal(t[theirs].data, sd[ours][:V].numpy())
    q = t["blk.1.attn_q.weight"].data
    assert not np.array_equal(q, sd["layers.1.attn.q_proj.weight"].numpy())  # permuted for llama.cpp's RoPE
    assert np.array_equal(q, _permute_rope(sd["layers.1.attn.q_proj.weight"], 4).numpy())
    assert np.array_equal(t["blk.1.attn_k.bias"].data, _permute_rope(sd["layers.1.attn.k_proj.bias"], 2).numpy())
    assert np.array_equal(t["blk.0.ffn_gate.weight"].data, sd["layers.0.mlp.gate_proj.weight"].numpy())
    assert np.array_equal(t["blk.0.attn_output.bias"].data, sd["layers.0.attn.o_proj.bias"].numpy())


def test_gpt2_fused_qkv_and_types(tmp_path, bpe):
    m = model_of("gpt2", bias=True)
    sd = m.state_dict()
    qkv = torch.cat([sd[f"layers.0.attn.{n}_proj.weight"] for n in "qkv"], 0)
    for qtype, want in (("f16", "F16"), ("bf16", "BF16"), ("q8_0", "Q8_0")):
        f, t = read(write_gguf(m, m.cfg, bpe, tmp_path / f"{qtype}.gguf", qtype))
        assert f["general.architecture"] == "gpt2"
        assert f["general.file_type"] == {"f16": 1, "bf16": 32, "q8_0": 7}[qtype]
        assert "chat_template" not in str(list(f)) and "tokenizer.ggml.eot_token_id" not in f  # not a chat model
        assert t["position_embd.weight"].tensor_type.name == want and list(t["position_embd.weight"].shape) == [64, 32]
        assert t["blk.0.attn_norm.bias"].tensor_type.name == "F32"  # vectors stay f32
        assert "output.weight" not in t  # tied: llama.cpp reuses token_embd
        w = t["blk.0.attn_qkv.weight"]
        assert list(w.shape) == [64, 192] and w.tensor_type.name == want
        back = gguf.quants.dequantize(w.data, w.tensor_type).reshape(192, 64)
        err = np.abs(back - qkv.numpy()).max() / np.abs(qkv.numpy()).max()
        assert err < {"f16": 1e-3, "bf16": 8e-3, "q8_0": 1e-2}[qtype], err
        assert err > 0
        if qtype == "f16":
            assert np.array_equal(w.data, qkv.numpy().astype(np.float16))


def test_qwen3_and_q8_0_fallback_for_odd_rows(tmp_path, bpe):
    cfg = GPTConfig(arch="llama", vocab_size=320, block_size=32, n_layer=1, n_head=2, d_model=64, d_ff=48,
                    qk_norm=True, bias=False)
    m = build_model(cfg, seed=1).eval()
    f, t = read(write_gguf(m, m.cfg, bpe, tmp_path / "q.gguf", "q8_0"))
    assert f["general.architecture"] == "qwen3"
    assert list(t["blk.0.attn_q_norm.weight"].shape) == [32] and t["blk.0.attn_q_norm.weight"].tensor_type.name == "F32"
    assert t["blk.0.ffn_up.weight"].tensor_type.name == "Q8_0"  # rows of 64
    assert t["blk.0.ffn_down.weight"].tensor_type.name == "F16"  # rows of 48: not a multiple of 32
    assert np.array_equal(t["blk.0.attn_q.weight"].data.shape, (64, 68))  # q8_0 bytes: 64 rows of 2 blocks x 34
    sd = m.state_dict()  # qwen3 keeps our rotate-half layout: no permutation
    back = gguf.quants.dequantize(t["blk.0.attn_q.weight"].data, gguf.GGMLQuantizationType.Q8_0)
    assert np.abs(back - sd["layers.0.attn.q_proj.weight"].numpy()).max() < 0.01 * 0.02 * 5


def test_char_tokenizer_as_byte_level_bpe(tmp_path):
    tok = char_tokenizer(["abc é 東\n"])
    m = model_of("gpt2", vocab=64, bias=True)
    f, _ = read(write_gguf(m, m.cfg, tok, tmp_path / "c.gguf", "f32"))
    b = _byte_level_table()
    toks, vocab = f["tokenizer.ggml.tokens"], tok.hf.get_vocab(with_added_tokens=True)
    assert len(toks) == tok.vocab_size == 12  # 4 specials, <|unk|>, 7 characters; the 64 rows cut
    assert toks[vocab["a"]] == "a" and toks[vocab[" "]] == "Ġ" and toks[vocab["\n"]] == "Ċ"
    assert toks[vocab["é"]] == b[0xC3] + b[0xA9] and toks[vocab["東"]] == b[0xE6] + b[0x9D] + b[0xB1]
    assert f["tokenizer.ggml.merges"] == [f"{b[0xC3]} {b[0xA9]}", f"{b[0xE6]} {b[0x9D]}",
                                          f"{b[0xE6]}{b[0x9D]} {b[0xB1]}"]
    assert f["tokenizer.ggml.unknown_token_id"] == vocab[UNK] and f["tokenizer.ggml.token_type"][vocab[UNK]] == 3


@pytest.mark.parametrize("arch,opts,key", [("llama", {"logit_softcap": 30.0}, "logit_softcap"),
                                           ("gpt2", {"mlp_act": "relu2"}, "mlp_act=relu2"),
                                           ("gpt2", {"qk_norm": True}, "qk_norm")])
def test_refuses_what_llama_cpp_cannot_run(tmp_path, bpe, arch, opts, key):
    m = model_of(arch, **opts)
    with pytest.raises(UserError) as e:
        write_gguf(m, m.cfg, bpe, tmp_path / "x.gguf")
    assert str(e.value).startswith("cannot export GGUF: ") and key in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "x.gguf").exists()


def test_cli_export_gguf_from_checkpoint(tmp_path, trained_run, capsys):
    out = tmp_path / "tiny.gguf"
    assert cli_main(["export-gguf", "--checkpoint", str(trained_run), "--out", str(out), "--type", "q8_0"]) == 0
    assert "FROM ./tiny.gguf" in capsys.readouterr().out
    f, t = read(out)
    from gptforge.checkpoint import checkpoint_dir_of, model_config

    ck = checkpoint_dir_of(trained_run)
    tok, cfg = load_tokenizer(ck), model_config(ck)
    assert cfg.vocab_size % 64 == 0 and tok.vocab_size < cfg.vocab_size  # padded: cut back
    assert len(f["tokenizer.ggml.tokens"]) == tok.vocab_size
    assert list(t["token_embd.weight"].shape) == [64, tok.vocab_size]
    assert f["tokenizer.ggml.merges"] == ["<|endoftext|> <|endoftext|>"]  # ASCII chars: one merge that never applies
    assert cli_main(["export-gguf", "--checkpoint", str(trained_run), "--out", str(out)]) == 2  # exists: --force
    assert "--force" in capsys.readouterr().err
    assert cli_main(["export-gguf", "--checkpoint", str(trained_run), "--out", str(out), "--force",
                     "--type", "f32"]) == 0
    assert read(out)[1]["token_embd.weight"].tensor_type.name == "F32"
