"""Tokenizers: exact round trips (Chinese, emoji, mixed UTF-8), reserved special tokens, save/load, CLI."""

import json
import shutil

import pytest

from gptforge.data import tokenizer as T
from gptforge.errors import UserError

MIXED = "Hello world, ça va? 你好，世界！床前明月光 🎉👨‍👩‍👧 naïve\n\n\ttabs  and  spaces\r\nend"
CORPUS = ["To be, or not to be, that is the question:\n", "Whether 'tis nobler in the mind to suffer\n",
          "天地玄黄，宇宙洪荒。日月盈昃，辰宿列张。\n", "emoji 😀🎉 mixed 中文 text\n"] * 30


@pytest.fixture(scope="module")
def gpt2():
    return T.gpt2_tokenizer()


@pytest.fixture(scope="module")
def bpe():
    return T.train_bpe(CORPUS, vocab_size=300)


def test_gpt2_ids_match_gpt2(gpt2):
    assert gpt2.kind == "gpt2" and gpt2.vocab_size == 50260
    assert gpt2.encode("Hello world") == [15496, 995]  # GPT-2's well-known ids
    assert gpt2.special == {"<|endoftext|>": 50256, "<|im_start|>": 50257, "<|im_end|>": 50258, "<|pad|>": 50259}
    assert (gpt2.eos_id, gpt2.pad_id) == (50256, 50259)


def test_gpt2_matches_transformers(gpt2, tmp_path):
    transformers = pytest.importorskip("transformers")
    enc, merges = T.gpt2_files()
    shutil.copy(enc, tmp_path / "vocab.json")
    shutil.copy(merges, tmp_path / "merges.txt")
    ref = transformers.GPT2TokenizerFast.from_pretrained(tmp_path)
    text = MIXED + " The quick brown fox's 123 jumps."
    assert gpt2.encode(text) == ref(text)["input_ids"]


@pytest.mark.parametrize("name", ["gpt2", "bpe"])
def test_utf8_round_trip_and_specials(name, gpt2, bpe):
    tok = {"gpt2": gpt2, "bpe": bpe}[name]
    assert tok.decode(tok.encode(MIXED)) == MIXED
    ids = tok.encode("a<|im_start|>user\nhi<|im_end|><|endoftext|>")
    for s in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        assert ids.count(tok.special[s]) == 1
    assert ids[-1] == tok.eos_id
    assert tok.decode(ids) == "a<|im_start|>user\nhi<|im_end|><|endoftext|>"


def test_bpe_reserves_specials_first(bpe, tmp_path):
    assert bpe.kind == "bpe" and bpe.vocab_size == 300
    assert list(bpe.special.values()) == [0, 1, 2, 3]
    assert len(bpe.encode("To be, or not to be")) < len("To be, or not to be")  # merges learned
    bpe.save(tmp_path)
    again = T.load_tokenizer(tmp_path)
    assert again.kind == "bpe" and again.encode(MIXED) == bpe.encode(MIXED)


def test_char_tokenizer(tmp_path):
    tok = T.char_tokenizer(iter(["hello\n", "wörld 中"]))
    assert tok.kind == "char" and tok.special == {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "<|pad|>": 3}
    # 5 reserved (4 specials + <|unk|>), then the 11 distinct characters in code-point order:
    # \n=5 ' '=6 d=7 e=8 h=9 l=10 o=11 r=12 w=13 ö=14 中=15
    assert tok.vocab_size == 16
    assert tok.encode("\n hello") == [5, 6, 9, 8, 10, 10, 11]
    s = "hello wörld\n中<|endoftext|>"
    assert tok.decode(tok.encode(s)) == s and tok.encode(s)[-1] == 0
    assert tok.encode("x") == [4]  # unknown character -> <|unk|>
    path = tok.save(tmp_path / "t")
    assert json.loads((tmp_path / "t" / "tokenizer_meta.json").read_text())["kind"] == "char"
    again = T.load_tokenizer(path)
    assert again.kind == "char" and again.encode(s) == tok.encode(s)


def test_transformers_loads_saved_tokenizer(bpe, tmp_path):
    transformers = pytest.importorskip("transformers")
    bpe.save(tmp_path)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    assert fast(MIXED)["input_ids"] == bpe.encode(MIXED)


def test_build_tokenizer_specs(tmp_path, bpe):
    assert T.build_tokenizer("gpt2").vocab_size == 50260
    assert T.build_tokenizer("char", ["ab"]).vocab_size == 7
    bpe.save(tmp_path)
    assert T.build_tokenizer(str(tmp_path / "tokenizer.json")).vocab_size == 300
    with pytest.raises(UserError, match="unknown tokenizer 'nope'"):
        T.build_tokenizer("nope")
    with pytest.raises(UserError, match="no text"):
        T.build_tokenizer("char")
    with pytest.raises(UserError, match="too small"):
        T.train_bpe(["abc"], vocab_size=100)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="not a valid tokenizer.json"):
        T.load_tokenizer(tmp_path / "bad.json")


def test_train_tokenizer_cli(tmp_path):
    from gptforge.cli import main

    (tmp_path / "a.txt").write_text("".join(CORPUS))
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "中文 jsonl 文本"}) + "\n")
    assert main(["train-tokenizer", "--input", str(tmp_path), "--vocab-size", "300", "--out", str(tmp_path / "tok")]) == 0
    tok = T.load_tokenizer(tmp_path / "tok")
    assert tok.kind == "bpe" and tok.vocab_size == 300 and tok.decode(tok.encode(MIXED)) == MIXED
    assert main(["train-tokenizer", "--input", str(tmp_path / "missing.txt"), "--vocab-size", "300",
                 "--out", str(tmp_path / "x")]) == 2


def test_char_fast_path_equals_hf():
    tok = T.char_tokenizer(["abc 中\n🎉"])
    for s in ["abc 中\n🎉 unknown ü", "a<|im_end|>b<|x", ""]:
        assert tok.encode_array(s).tolist() == tok.encode(s)
    assert tok.encode_array("cab🎉z").tolist() == [9, 7, 8, 11, 4]  # \n=5 " "=6 a=7 b=8 c=9 中=10 🎉=11, z unknown


def test_load_is_lazy_when_the_meta_describes_the_file(tmp_path, bpe):
    bpe.save(tmp_path / "t")
    meta = json.loads((tmp_path / "t" / "tokenizer_meta.json").read_text())
    assert meta["vocab_size"] == 300 and meta["special"]["<|im_end|>"] == bpe.special["<|im_end|>"]
    lazy = T.load_tokenizer(tmp_path / "t")
    assert lazy._hf is None  # not built: only the facts from the meta
    assert (lazy.vocab_size, lazy.eos_id, lazy.pad_id, lazy.special, lazy.bos_ids) == \
        (bpe.vocab_size, bpe.eos_id, bpe.pad_id, bpe.special, bpe.bos_ids)
    lazy.save(tmp_path / "copy")  # a lazy save writes the same bytes, still without building it
    assert lazy._hf is None
    for f in ("tokenizer.json", "tokenizer_meta.json"):
        assert (tmp_path / "copy" / f).read_bytes() == (tmp_path / "t" / f).read_bytes()
    text = "Hello <|im_end|> wörld"
    assert lazy.encode(text) == bpe.encode(text) and lazy._hf is not None  # built on first use, same ids


def test_lazy_load_checks_the_meta_and_falls_back(tmp_path, bpe):
    bpe.save(tmp_path / "t")
    meta_file = tmp_path / "t" / "tokenizer_meta.json"
    meta = json.loads(meta_file.read_text())
    # a meta that names another file (sha256) or lacks the facts: built and checked at load, as before
    for broken in ({**meta, "sha256": "0" * 64}, {"kind": "bpe", "vocab_size": 300}):
        meta_file.write_text(json.dumps(broken))
        assert T.load_tokenizer(tmp_path / "t")._hf is not None
    # facts that do not match the file: one line at first use
    meta_file.write_text(json.dumps({**meta, "vocab_size": 999}))
    lazy = T.load_tokenizer(tmp_path / "t")
    assert lazy.vocab_size == 999 and lazy._hf is None
    with pytest.raises(UserError, match="does not match the tokenizer_meta.json beside it"):
        lazy.encode("a")
