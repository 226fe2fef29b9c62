"""`gptforge prepare`: tokenize text into token files the loader memory-maps.

    gptforge prepare --input "books/**/*.txt" data.jsonl --out data/mine --tokenizer gpt2

Output directory:
  train.bin, val.bin   raw little-endian uint16 (vocab <= 65536) or uint32 token ids, documents
                       each followed by the eos token
  tokenizer.json       (+ tokenizer_meta.json) the tokenizer used
  meta.json            {"dtype", "vocab_size", "tokenizer", "kind", "splits": {"train": n, "val": n},
                        "sources", "eos_id", "val_fraction", "documents"}; written last, so its presence
                       means the directory is complete.

Special tokens: the text is data, so strings such as "<|endoftext|>" or "<|im_start|>" in it are encoded as
plain text (as tiktoken refuses them by default); the only special ids are the eos tokens put between documents.
`--allow-special` encodes them as their special ids instead. The summary says how many there were.

Streaming: the input is read in pieces and tokens are appended to the .bin files as they come, so a
corpus larger than memory works; the pieces are encoded on all cores a few batches ahead (data/encode.py),
with the same bytes as the serial path. The validation split is taken deterministically from the token stream:
it is cut into blocks of VAL_BLOCK tokens and about one block in 1/val_fraction goes to val (spread over
the whole corpus); a corpus too small for one such block gives val its last tokens instead. val_fraction 0:
no validation split (val.bin empty; validate with data.val_path).

A fixed validation set (data.val_path, `ensure_val_prepared`): the text is tokenized with the training data's
tokenizer into val.bin alone, each document *preceded* by the eos token (no trailing one), so that for one
text file val.bin is exactly the [eos, *ids] that `gptforge eval --text` scores; a char tokenizer's unknown
characters become <|unk|> (counted in meta.json's "unknown"). Cached under <cache>/datasets/val-... keyed on
the files' content (not their mtime: copies on machines with disks of their own give the same key).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from gptforge.data.corpus import checked_cache_dir, shakespeare_path
from gptforge.fileio import write_file_atomic
from gptforge.data.encode import encode_stream
from gptforge.data.sources import Source, iter_texts, resolve_inputs
from gptforge.data.tokenizer import SPECIAL_TOKENS, UNK, Tokenizer, build_tokenizer, load_tokenizer
from gptforge.errors import UserError

VAL_BLOCK = 8192          # tokens per train/val routing block
FORMAT_VERSION = 1
SPECIALS_AS_TEXT = "specials-as-text"  # in the cache keys: datasets cached before this rule are not reused


def check_val_fraction(value: float, name: str) -> None:
    """The one rule of a validation share (`prepare --val-fraction`, config key data.val_fraction): in [0, 0.5),
    0 meaning no validation split. UserError naming it (`name`: how the user spelled it) otherwise."""
    if not 0 <= value < 0.5:
        raise UserError(f"{name} must be in [0, 0.5), got {value!r}; e.g. 0.01 (0: no validation split)")


def token_dtype(vocab_size: int) -> np.dtype:
    if vocab_size <= 1 << 16:
        return np.dtype("<u2")
    if vocab_size <= 1 << 32:
        return np.dtype("<u4")
    raise UserError(f"vocab_size {vocab_size} does not fit in uint32 token files; use a smaller tokenizer")


def _bar(desc: str, total: int | None, enabled: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, file=sys.stderr, disable=not enabled,
                dynamic_ncols=True)


def _total_bytes(sources: list[Source]) -> int | None:
    sizes = [s.size() for s in sources]
    return None if None in sizes else sum(sizes)


class _Splitter:
    """Appends tokens to train/val files, routing whole VAL_BLOCK-token blocks to val (see module doc)."""

    def __init__(self, out: Path, dtype: np.dtype, val_fraction: float, block: int = VAL_BLOCK):
        out.mkdir(parents=True, exist_ok=True)
        (out / "meta.json").unlink(missing_ok=True)  # the directory is incomplete until meta.json is back
        self.files = {"train": open(out / "train.bin.tmp", "wb"), "val": open(out / "val.bin.tmp", "wb")}
        self.counts = {"train": 0, "val": 0}
        self.dtype, self.frac, self.block = dtype, val_fraction, block
        self.block_i = self.in_block = 0

    def _split(self, i: int) -> str:  # ~ every (1/frac)-th block, the first one half way in
        return "val" if math.floor((i + 1) * self.frac + 0.5) > math.floor(i * self.frac + 0.5) else "train"

    def write(self, ids: np.ndarray) -> None:
        ids = ids.astype(self.dtype, copy=False)
        while len(ids):
            take = min(len(ids), self.block - self.in_block)
            split = self._split(self.block_i)
            self.files[split].write(ids[:take].tobytes())
            self.counts[split] += take
            ids, self.in_block = ids[take:], self.in_block + take
            if self.in_block == self.block:
                self.block_i, self.in_block = self.block_i + 1, 0

    def finish(self) -> dict[str, int]:
        """Close the files; if val got nothing (and a split was asked for), move the end of train there."""
        n = self.counts["train"]
        if self.counts["val"] == 0 and n > 1 and self.frac > 0:
            k = min(n - 1, max(math.ceil(self.frac * n), min(self.block, n // 10)))
            f = self.files["train"]
            f.flush()
            size = self.dtype.itemsize
            with open(f.name, "rb") as r:
                r.seek((n - k) * size)
                self.files["val"].write(r.read(k * size))
            f.truncate((n - k) * size)
            self.counts["train"], self.counts["val"] = n - k, k
        for f in self.files.values():
            f.close()
        return dict(self.counts)

    def discard(self) -> None:
        """Close and remove the unfinished files (an error, an interrupt)."""
        for f in self.files.values():
            f.close()
            Path(f.name).unlink(missing_ok=True)


def _counting_specials(pieces, seen: list[int]):
    """The (text, ends_document) pieces as they come; seen[1] += the special-token strings they spell."""
    for text, end in pieces:
        if "<|" in text:
            seen[1] += sum(text.count(s) for s in SPECIAL_TOKENS)
        yield text, end


def prepare(inputs, out_dir: str | Path, tokenizer: str | Path | Tokenizer = "char", val_fraction: float = 0.01,
            field: str = "text", hf_split: str = "train", progress: bool = True,
            val_key: str = "--val-fraction", parallel: bool = True, stats: dict | None = None,
            fixed_val: bool = False, allow_special: bool = False) -> dict:
    """Tokenize `inputs` (files, folders, globs, comma lists, HF datasets; see data/sources.py) into `out_dir`.

    tokenizer: "char", "gpt2", "bpe:N" (trained on the inputs), a tokenizer path, or a Tokenizer (e.g. the one
    of the model a run starts from). Returns meta.json's dict. parallel=False: the serial reference path
    (data/encode.py), same bytes. `stats`, if given, receives the tokenizing pass' bytes, tokens, seconds and
    special_strings (how often the text spells a special token: plain text unless allow_special; module doc).
    fixed_val: a validation set (module doc): every token to val.bin, each document preceded by eos."""
    if not fixed_val:
        check_val_fraction(val_fraction, val_key)
    sources = resolve_inputs(inputs, field=field, split=hf_split, flag="data.val_path" if fixed_val else "--input")
    total = _total_bytes(sources)
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else _tokenizer(str(tokenizer), sources, total, progress)
    dtype = token_dtype(tok.vocab_size)
    out = Path(out_dir)
    splitter = _Splitter(out, dtype, 1.0 if fixed_val else val_fraction)  # fraction 1: every block to val
    n_docs = n_tokens = unknown = 0
    unk_id = tok.hf.token_to_id(UNK) if fixed_val and tok.kind == "char" else None
    held = np.array([tok.eos_id], dtype=np.int64)  # fixed_val: eos first; each chunk's last token waits
    seen = [0, 0]  # input bytes read, special-token strings seen

    def read(n: int) -> None:
        seen[0] += n
        bar.update(n)

    try:
        t0 = time.perf_counter()
        with _bar("tokenizing", total, progress) as bar, closing(encode_stream(
                tok, _counting_specials(iter_texts(sources, read), seen), parallel, allow_special)) as stream:
            for ids, docs in stream:  # closing: an error here stops the encoding thread at once
                if fixed_val:  # the stream's very last token (the last document's eos) is never written
                    ids, held = np.concatenate([held, ids]), ids[-1:] if len(ids) else held
                    ids = ids[:-1]
                    unknown += int(np.count_nonzero(ids == unk_id)) if unk_id is not None else 0
                splitter.write(ids)
                n_docs, n_tokens = n_docs + docs, n_tokens + len(ids)
                bar.set_postfix_str(f"{n_tokens / max(time.perf_counter() - t0, 1e-9):,.0f} tok/s", refresh=False)
        counts = splitter.finish()
        if stats is not None:
            stats.update(bytes=seen[0], tokens=n_tokens, seconds=time.perf_counter() - t0,
                         special_strings=seen[1])
        if n_tokens <= n_docs:  # nothing but eos tokens
            raise UserError(f"no text found in {', '.join(map(str, [inputs] if isinstance(inputs, (str, Path)) else inputs))}; "
                            "check that the files are not empty (and --field for JSONL)")
    except BaseException:
        splitter.discard()
        raise
    for s in ("train", "val"):
        os.replace(out / f"{s}.bin.tmp", out / f"{s}.bin")
    tok.save(out)
    meta = {"format": FORMAT_VERSION, "dtype": dtype.name, "vocab_size": tok.vocab_size, "tokenizer": "tokenizer.json",
            "kind": tok.kind, "splits": counts, "sources": [s.path for s in sources], "eos_id": tok.eos_id,
            "val_fraction": val_fraction, "documents": n_docs}
    meta |= {"fixed_val": True, "val_fraction": None, "unknown": unknown} if fixed_val else {}
    write_file_atomic(out / "meta.json", json.dumps(meta, indent=2) + "\n")  # last: marks a complete dataset
    return meta


def _tokenizer(spec: str, sources, total: int, progress: bool):
    """A named or saved tokenizer, or char / bpe:N built from the inputs in a first streaming pass."""
    if spec == "char" or spec.startswith("bpe:"):
        with _bar(f"building {spec} tokenizer", total, progress) as bar:
            return build_tokenizer(spec, (t for t, _ in iter_texts(sources, bar.update)))
    return build_tokenizer(spec)


def _cache_key(sources: list[Source], tokenizer: str, val_fraction: float) -> str:
    """Hash of what the prepared data depends on: paths, sizes, mtimes, tokenizer, split settings."""
    parts: list = [FORMAT_VERSION, SPECIALS_AS_TEXT, val_fraction]
    for s in sources:
        p = Path(s.path)
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p] if p.exists() else []
        stats = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
        parts.append([s.kind, s.path if s.kind == "hf_hub" else str(p.resolve()), s.field, s.split, stats])
    tok_path = Path(tokenizer).expanduser()
    tok_file = tok_path / "tokenizer.json" if tok_path.is_dir() else tok_path
    parts.append(hashlib.sha256(tok_file.read_bytes()).hexdigest() if tok_file.is_file() else tokenizer)
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def ensure_prepared(path=None, tokenizer: str | Path | Tokenizer | None = None, cache: str | Path | None = None,
                    val_fraction: float = 0.01, field: str = "text", progress: bool = True) -> Path:
    """The prepared-dataset directory for `path`, preparing it into the cache when needed.

    path: a directory holding meta.json (used as is); raw inputs (file, folder, glob, list; prepared once
    into <cache>/datasets/<hash>); or None (the built-in Shakespeare corpus). tokenizer: a spec as prepare()
    takes (default char) or a Tokenizer (cached under the hash of its tokenizer.json)."""
    if isinstance(path, (list, tuple)) and len(path) == 1:
        path = path[0]
    if path is not None and not isinstance(path, (list, tuple)) and (Path(path).expanduser() / "meta.json").is_file():
        return Path(path).expanduser()
    root = Path(cache or checked_cache_dir())
    inputs = [shakespeare_path(root)] if path is None else path
    spec = key = str(tokenizer or "char")
    if isinstance(tokenizer, Tokenizer):
        spec = f"{tokenizer.kind}{tokenizer.vocab_size}"
        key = f"{tokenizer.kind} tokenizer.json {hashlib.sha256(tokenizer.hf.to_str().encode()).hexdigest()}"
    sources = resolve_inputs(inputs, field=field)
    final = root / "datasets" / f"{'shakespeare' if path is None else 'data'}-{spec.split('/')[-1].replace(':', '')}-" \
                                f"{_cache_key(sources, key, val_fraction)}"
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else spec
    return _prepare_into(final, lambda tmp: prepare(inputs, tmp, tok, val_fraction=val_fraction, field=field,
                                                    progress=progress, val_key="config key 'data.val_fraction'"))


def _prepare_into(final: Path, fill) -> Path:
    """`final` if complete, else fill(tmp dir) and rename it to `final` (atomic: ranks or nodes preparing the
    same dataset at once each finish, the first rename wins)."""
    if (final / "meta.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".preparing-", dir=final.parent))
    try:
        fill(tmp)
        try:
            os.replace(tmp, final)  # atomic; fails if another process finished first
        except OSError:
            if not (final / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _content_hash(sources: list[Source]) -> list:
    """What a validation set's files hold (sha256 of their bytes; a hub dataset: its name and split)."""
    out: list = []
    for s in sources:
        if s.kind == "hf_hub":
            out.append([s.kind, s.path, s.field, s.split])
            continue
        p = Path(s.path)
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        digests = []
        for f in files:
            h = hashlib.sha256()
            with open(f, "rb") as r:
                while chunk := r.read(1 << 20):
                    h.update(chunk)
            digests.append(h.hexdigest())
        out.append([s.kind, s.field, s.split, digests])
    return out


def ensure_val_prepared(val_path: str, data_dir: str | Path, cache: str | Path | None = None, field: str = "text",
                        progress: bool = True) -> Path:
    """data.val_path as a prepared directory whose val.bin is the validation set, tokenized with the tokenizer
    of the prepared training data in `data_dir` (module doc). A prepared dataset directory is used as is (its
    val split) when its tokenizer is the training data's. UserError (one line, naming data.val_path) otherwise."""
    tok_file = Path(data_dir) / "tokenizer.json"
    parts = [s for s in str(val_path).split(",") if s]
    if len(parts) == 1 and (Path(parts[0]).expanduser() / "meta.json").is_file():
        d = Path(parts[0]).expanduser()
        ours, theirs = load_tokenizer(tok_file), load_tokenizer(d)
        if (ours.kind, ours.hf.get_vocab(True)) != (theirs.kind, theirs.hf.get_vocab(True)):  # True: added tokens too
            raise UserError(f"data.val_path {val_path} was prepared with another tokenizer ({theirs.kind}, vocab "
                            f"{theirs.vocab_size}) than the training data ({ours.kind}, vocab {ours.vocab_size}); "
                            "give the validation text itself (a file) so it is tokenized like the training data")
        if json.loads((d / "meta.json").read_text())["splits"].get("val", 0) == 0:
            raise UserError(f"data.val_path {val_path} is a prepared dataset without a validation split; "
                            "give the validation text itself (a file)")
        return d
    try:
        sources = resolve_inputs(parts or [str(val_path)], field=field, flag="data.val_path")
    except UserError as e:
        raise UserError(f"config key 'data.val_path': {e}") from None
    tok_hash = hashlib.sha256(tok_file.read_bytes()).hexdigest()
    key = hashlib.sha256(json.dumps([FORMAT_VERSION, SPECIALS_AS_TEXT, "fixed_val", tok_hash,
                                     _content_hash(sources)]).encode())
    name = Path(parts[0] if len(parts) == 1 else "multi").name.replace(":", "")
    final = Path(cache or checked_cache_dir()) / "datasets" / f"val-{name}-{key.hexdigest()[:16]}"

    def fill(tmp: Path) -> None:
        try:
            prepare(parts or [str(val_path)], tmp, tok_file, field=field, progress=progress, fixed_val=True)
        except UserError as e:
            raise UserError(f"config key 'data.val_path': {e}") from None

    return _prepare_into(final, fill)


@dataclass
class PrepareOptions:
    """Tokenize text into train/val token files."""

    input: list[str]
    """text/JSONL/JSON/parquet files, folders, globs, comma lists, a save_to_disk dataset, or hf:NAME[:CONFIG]"""
    out: str
    """output directory"""
    tokenizer: str = "char"
    """char | gpt2 | bpe:VOCAB | path to tokenizer.json"""
    field: str = "text"
    """JSONL / dataset field holding the text"""
    val_fraction: float = 0.01
    """share of tokens held out for validation (0: none; validate with data.val_path)"""
    hf_split: str = "train"
    """split of a Hugging Face dataset"""
    no_progress: bool = False
    """no progress bar"""
    allow_special: bool = False
    """special-token strings in the text (<|endoftext|>, <|im_start|>, ...) become their special ids; by default
    they are plain text, so that a corpus cannot forge document or chat-turn boundaries"""


def main(opts: PrepareOptions) -> int:
    stats: dict = {}
    meta = prepare(opts.input, opts.out, opts.tokenizer, opts.val_fraction, opts.field, opts.hf_split,
                   progress=not opts.no_progress, stats=stats, allow_special=opts.allow_special)
    s = max(stats["seconds"], 1e-9)
    print(f"wrote {opts.out}: {meta['splits']['train']:,} train + {meta['splits']['val']:,} val tokens "
          f"({meta['kind']} tokenizer, vocab {meta['vocab_size']}, {meta['dtype']}, {meta['documents']:,} documents)"
          f"; tokenized {stats['bytes'] / 1e6:,.1f} MB in {s:.1f} s: {stats['bytes'] / 1e6 / s:.2f} MB/s, "
          f"{stats['tokens'] / s:,.0f} tokens/s")
    if stats["special_strings"]:
        how = "as their special ids (--allow-special)" if opts.allow_special else \
            "as plain text (--allow-special: as their special ids)"
        print(f"the text spells special tokens ({', '.join(SPECIAL_TOKENS)}) {stats['special_strings']:,} "
              f"time(s): encoded {how}")
    return 0
