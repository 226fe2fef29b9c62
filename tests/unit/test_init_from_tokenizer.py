"""`pretrain --init-from` tokenizes the data with the tokenizer of the model it starts from (an exported Hugging Face
folder or a gptforge checkpoint), and saves that tokenizer with its checkpoints; a data.tokenizer that is not the
model's, or a dataset prepared with another tokenizer, is refused in one line."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest

from gptforge.checkpoint import checkpoint_dir_of, save_checkpoint
from gptforge.cli import main
from gptforge.data.prepare import prepare
from gptforge.data.tokenizer import char_tokenizer, load_tokenizer, train_bpe
from gptforge.hf.export import export_model
from gptforge.hf.init_from import init_tokenizer
from gptforge.model.gpt import GPTConfig, build_model
from gptforge.parallel.mesh import DistEnv

MODEL_TEXT = "the quick brown fox jumps over the lazy dog; a fox, a dog and a cat. "
DATA_TEXT = "The lazy cat watches the quick fox jump over the brown dog, then sleeps. " * 30  # has T, h, w, ...


def _cfg(vocab: int) -> GPTConfig:
    return GPTConfig(arch="llama", vocab_size=vocab, block_size=16, n_layer=1, n_head=2, n_kv_head=2, d_model=32,
                     d_ff=64, bias=False, tie_embeddings=False)


@pytest.fixture(scope="module")
def bpe():
    return train_bpe([MODEL_TEXT * 3] * 40, 300)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, bpe) -> Path:
    """An export-hf folder of a tiny Llama-style model with a trained BPE (about 300 tokens)."""
    out = tmp_path_factory.mktemp("init_tok") / "hf"
    cfg = _cfg(320)
    with tempfile.TemporaryDirectory() as d:
        bpe.save(d)
        export_model(build_model(cfg, seed=1), cfg.complete(), out, tokenizer_dir=d)
    return out


@pytest.fixture(scope="module")
def char_run(tmp_path_factory) -> Path:
    """A gptforge checkpoint of a tiny model whose char tokenizer was built from MODEL_TEXT (no 'T', 'w', ...)."""
    out = tmp_path_factory.mktemp("init_tok_char")
    tok = char_tokenizer([MODEL_TEXT])
    cfg = _cfg(64)
    assert tok.vocab_size <= cfg.vocab_size
    with tempfile.TemporaryDirectory() as d:
        tok.save(d)
        files = {f.name: f.read_bytes() for f in Path(d).iterdir()}
    files["model_config.json"] = json.dumps(cfg.to_dict())
    files["config.json"] = json.dumps({"model": {"preset": "test"}})
    save_checkpoint(out, 3, build_model(cfg, seed=1), None, {"step": 3}, DistEnv(), files)
    return out


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("init_tok_text") / "data.txt"
    p.write_text(DATA_TEXT, encoding="utf-8")
    return p


def _args(init, data, out, *extra) -> list[str]:
    return ["pretrain", f"--init-from={init}", f"--data.path={data}", f"--train.out_dir={out}",
            "--train.max_steps=2", "--train.micro_batch=2", "--train.precision=fp32", "--train.eval_every=0",
            "--train.sample_tokens=0", "--train.progress=false", "--train.tensorboard=false",
            "--train.warmup_steps=1", "--data.val_fraction=0", *extra]


@pytest.mark.parametrize("source", ["hf", "gptforge"])
def test_pretrain_init_from_uses_the_models_tokenizer(tmp_path, capsys, request, text, source):
    init = request.getfixturevalue("hf_folder" if source == "hf" else "char_run")
    own = init_tokenizer(init)
    assert main(_args(init, text, tmp_path / "run")) == 0
    log = capsys.readouterr()
    saved = load_tokenizer(checkpoint_dir_of(tmp_path / "run"))  # the tokenizer the checkpoint is used with
    assert saved.hf.to_str() == own.hf.to_str() and saved.kind == own.kind
    assert saved.encode(DATA_TEXT) == own.encode(DATA_TEXT)
    # the data was encoded with it: the prepared dataset (the log's "data: DIR") has its kind, vocab and ids
    data_dirs = [Path(w) for w in log.out.split() if (Path(w) / "meta.json").is_file()]
    assert data_dirs, log.out + log.err
    meta = json.loads((data_dirs[0] / "meta.json").read_text())
    assert (meta["kind"], meta["vocab_size"]) == (own.kind, own.vocab_size)
    assert (own.kind, own.vocab_size > 200) == (("bpe", True) if source == "hf" else ("char", False))
    ids = np.fromfile(data_dirs[0] / "train.bin", dtype=meta["dtype"])
    want = own.encode(DATA_TEXT)
    assert ids[:len(want)].tolist() == want
    if source == "hf":  # BPE merges: fewer ids than characters
        assert len(want) < len(DATA_TEXT) // 2
    else:  # the model's own characters: those it never saw are <|unk|>, not new ids
        assert max(want) < own.vocab_size and len(want) == len(DATA_TEXT) and own.decode(want) != DATA_TEXT


def one_line_error(capsys, argv) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if "gptforge: error:" in x]
    assert len(lines) == 1 and "Traceback" not in err and err.rstrip().endswith(lines[0]), err
    return lines[0]


def test_pretrain_init_from_with_another_tokenizer_is_refused(tmp_path, capsys, text, hf_folder, bpe):
    out = tmp_path / "run"
    for spec, words in (("char", "data.tokenizer=char builds a new tokenizer from the data"),
                        ("bpe:300", "data.tokenizer=bpe:300 builds a new tokenizer"),):
        err = one_line_error(capsys, _args(hf_folder, text, out, f"--data.tokenizer={spec}"))
        assert words in err and "leave data.tokenizer out" in err, err
    other = tmp_path / "other_tok"
    train_bpe([DATA_TEXT] * 10, 300).save(other)
    err = one_line_error(capsys, _args(hf_folder, text, out, f"--data.tokenizer={other}"))
    assert f"data.tokenizer={other} is not the tokenizer of the model of --init-from {hf_folder} " \
        f"(bpe, {bpe.vocab_size} " in err, err
    # a dataset already prepared with another tokenizer
    prepare([str(text)], tmp_path / "prepared", "char", val_fraction=0.0, progress=False)
    err = one_line_error(capsys, _args(hf_folder, tmp_path / "prepared", out))
    assert "was prepared with another tokenizer (char" in err and f"(bpe, {bpe.vocab_size})" in err, err
    assert not (out / "checkpoints").exists()
    # the model's own tokenizer, named explicitly, is accepted
    assert main(_args(hf_folder, text, out, f"--data.tokenizer={hf_folder}")) == 0
    assert load_tokenizer(checkpoint_dir_of(out)).hf.to_str() == bpe.hf.to_str()
