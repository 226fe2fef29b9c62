"""`gptforge prepare`: tokenize text into token files the loader memory-maps.

    gptforge prepare --input "books/**/*.txt" data.jsonl --out data/mine --tokenizer gpt2

Output directory:
  train.bin, val.bin   raw little-endian uint16 (vocab <= 65536) or uint32 token ids, documents
                       each followed by the eos token
  tokenizer.json       (+ tokenizer_meta.json) the tokenizer used
  meta.json            {"dtype", "vocab_size", "tokenizer", "kind", "splits": {"train": n, "val": n},
                        "sources", "eos_id", "val_fraction", "documents"}; written last, so its presence
                       means the directory is complete.

Streaming: the input is read in pieces and tokens are appended to the .bin files as they come, so a
corpus larger than memory works; the pieces are encoded on all cores a few batches ahead (data/encode.py),
with the same bytes as the serial path. The validation split is taken deterministically from the token stream:
it is cut into blocks of VAL_BLOCK tokens and about one block in 1/val_fraction goes to val (spread over
the whole corpus); a corpus too small for one such block gives val its last tokens instead.
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
from gptforge.data.encode import encode_stream
from gptforge.data.sources import Source, iter_texts, resolve_inputs
from gptforge.data.tokenizer import build_tokenizer
from gptforge.errors import UserError

VAL_BLOCK = 8192          # tokens per train/val routing block
FORMAT_VERSION = 1


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
        """Close the files; if val got nothing, move the end of train there."""
        n = self.counts["train"]
        if self.counts["val"] == 0 and n > 1:
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


def prepare(inputs, out_dir: str | Path, tokenizer: str | Path = "char", val_fraction: float = 0.01,
            field: str = "text", hf_split: str = "train", progress: bool = True,
            val_key: str = "--val-fraction", parallel: bool = True, stats: dict | None = None) -> dict:
    """Tokenize `inputs` (files, folders, globs, comma lists, HF datasets; see data/sources.py) into `out_dir`.

    tokenizer: "char", "gpt2", "bpe:N" (trained on the inputs) or a tokenizer path. Returns meta.json's dict.
    parallel=False: the serial reference path (data/encode.py), same bytes. `stats`, if given, receives
    the tokenizing pass' bytes, tokens and seconds."""
    if not 0 < val_fraction < 0.5:
        raise UserError(f"{val_key} {val_fraction} must be between 0 and 0.5 (e.g. 0.01)")
    sources = resolve_inputs(inputs, field=field, split=hf_split)
    total = _total_bytes(sources)
    spec = str(tokenizer)
    if spec == "char" or spec.startswith("bpe:"):  # built from the corpus: a first streaming pass
        with _bar(f"building {spec} tokenizer", total, progress) as bar:
            tok = build_tokenizer(spec, (t for t, _ in iter_texts(sources, bar.update)))
    else:
        tok = build_tokenizer(spec)
    dtype = token_dtype(tok.vocab_size)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)  # the directory is incomplete until meta.json is back
    splitter = _Splitter(out, dtype, val_fraction)
    n_docs = n_tokens = 0
    seen = [0]  # input bytes read

    def read(n: int) -> None:
        seen[0] += n
        bar.update(n)

    try:
        t0 = time.perf_counter()
        with _bar("tokenizing", total, progress) as bar, closing(encode_stream(tok, iter_texts(sources, read),
                                                                              parallel)) as stream:
            for ids, docs in stream:  # closing: an error here stops the encoding thread at once
                splitter.write(ids)
                n_docs, n_tokens = n_docs + docs, n_tokens + len(ids)
                bar.set_postfix_str(f"{n_tokens / max(time.perf_counter() - t0, 1e-9):,.0f} tok/s", refresh=False)
        counts = splitter.finish()
        if stats is not None:
            stats.update(bytes=seen[0], tokens=n_tokens, seconds=time.perf_counter() - t0)
        if counts["train"] + counts["val"] <= n_docs:  # nothing but eos tokens
            raise UserError(f"no text found in {', '.join(map(str, [inputs] if isinstance(inputs, (str, Path)) else inputs))}; "
                            "check that the files are not empty (and --field for JSONL)")
    except BaseException:
        for f in splitter.files.values():
            f.close()
        for s in ("train", "val"):
            (out / f"{s}.bin.tmp").unlink(missing_ok=True)
        raise
    for s in ("train", "val"):
        os.replace(out / f"{s}.bin.tmp", out / f"{s}.bin")
    tok.save(out)
    meta = {"format": FORMAT_VERSION, "dtype": dtype.name, "vocab_size": tok.vocab_size, "tokenizer": "tokenizer.json",
            "kind": tok.kind, "splits": counts, "sources": [s.path for s in sources], "eos_id": tok.eos_id,
            "val_fraction": val_fraction, "documents": n_docs}
    tmp = out / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, out / "meta.json")
    return meta


def _cache_key(sources: list[Source], tokenizer: str, val_fraction: float) -> str:
    """Hash of what the prepared data depends on: paths, sizes, mtimes, tokenizer, split settings."""
    parts: list = [FORMAT_VERSION, val_fraction]
    for s in sources:
        p = Path(s.path)
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p] if p.exists() else []
        stats = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
        parts.append([s.kind, s.path if s.kind == "hf_hub" else str(p.resolve()), s.field, s.split, stats])
    tok_path = Path(tokenizer).expanduser()
    tok_file = tok_path / "tokenizer.json" if tok_path.is_dir() else tok_path
    parts.append(hashlib.sha256(tok_file.read_bytes()).hexdigest() if tok_file.is_file() else tokenizer)
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def ensure_prepared(path=None, tokenizer: str | Path | None = None, cache: str | Path | None = None,
                    val_fraction: float = 0.01, field: str = "text", progress: bool = True) -> Path:
    """The prepared-dataset directory for `path`, preparing it into the cache when needed.

    path: a directory holding meta.json (used as is); raw inputs (file, folder, glob, list; prepared once
    into <cache>/datasets/<hash>); or None (the built-in Shakespeare corpus). tokenizer defaults to char."""
    if isinstance(path, (list, tuple)) and len(path) == 1:
        path = path[0]
    if path is not None and not isinstance(path, (list, tuple)) and (Path(path).expanduser() / "meta.json").is_file():
        return Path(path).expanduser()
    root = Path(cache or checked_cache_dir())
    inputs = [shakespeare_path(root)] if path is None else path
    spec = str(tokenizer or "char")
    sources = resolve_inputs(inputs, field=field)
    final = root / "datasets" / f"{'shakespeare' if path is None else 'data'}-{spec.split('/')[-1].replace(':', '')}-" \
                                f"{_cache_key(sources, spec, val_fraction)}"
    if (final / "meta.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".preparing-", dir=final.parent))
    try:
        prepare(inputs, tmp, spec, val_fraction=val_fraction, field=field, progress=progress,
                val_key="data.val_fraction")
        try:
            os.replace(tmp, final)  # atomic; fails if another process finished first
        except OSError:
            if not (final / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


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
    """share of tokens held out for validation"""
    hf_split: str = "train"
    """split of a Hugging Face dataset"""
    no_progress: bool = False
    """no progress bar"""


def main(opts: PrepareOptions) -> int:
    stats: dict = {}
    meta = prepare(opts.input, opts.out, opts.tokenizer, opts.val_fraction, opts.field, opts.hf_split,
                   progress=not opts.no_progress, stats=stats)
    s = max(stats["seconds"], 1e-9)
    print(f"wrote {opts.out}: {meta['splits']['train']:,} train + {meta['splits']['val']:,} val tokens "
          f"({meta['kind']} tokenizer, vocab {meta['vocab_size']}, {meta['dtype']}, {meta['documents']:,} documents)"
          f"; tokenized {stats['bytes'] / 1e6:,.1f} MB in {s:.1f} s: {stats['bytes'] / 1e6 / s:.2f} MB/s, "
          f"{stats['tokens'] / s:,.0f} tokens/s")
    return 0
