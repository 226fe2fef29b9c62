"""Text pieces -> token ids, in order, on all cores: the tokenizing half of `gptforge prepare`.

The reader yields (text, ends_document) pieces (about 1 MiB of a text file, or one record; sources.py).
HF `tokenizers` encodes many small strings far faster than a few big ones (on 2 cores: 1 MiB pieces about
half the rate of 4 KiB ones), so for tokenizers where it is exact (Tokenizer.cuts_before_newlines) each
piece is cut into chunks of about CHUNK_CHARS just before a newline. Batches of chunks go to the
tokenizer's own batch encoding (Rust, every core, the GIL released) in a background thread, at most
IN_FLIGHT batches ahead of the caller, which meanwhile reads the next pieces and writes the previous ids:
the corpus is never held in memory and the order is kept.

The output equals the serial reference (`parallel=False`: whole pieces, one batch at a time, as before)
token for token; tests/unit/test_data_prepare.py compares the shard bytes of both.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from gptforge.data.tokenizer import Tokenizer

CHUNK_CHARS = 4096        # chunk size the pieces are cut to (at the first safe newline after it)
BATCH_CHARS = 1 << 20     # characters per batch handed to the tokenizer
BATCH_PIECES = 4096       # ... or this many chunks
IN_FLIGHT = 2             # batches being encoded ahead of the writer (bounds the memory)
SERIAL_BATCH_CHARS = 4 << 20  # the reference path's batches
# characters that some regex engine may take for whitespace although str.isspace() does not
_NOT_SURELY_TEXT = frozenset("\u180e\u200b\u2060\ufeff")


def cut(text: str, size: int) -> list[str]:
    """`text` in parts of at least `size` characters (but the last), each cut just before a "\\n" whose
    preceding character is not whitespace (see Tokenizer.cuts_before_newlines); ''.join(parts) == text."""
    parts, start, n = [], 0, len(text)
    while n - start > size:
        q = text.find("\n", start + size)
        while q != -1 and (text[q - 1].isspace() or text[q - 1] in _NOT_SURELY_TEXT):
            q = text.find("\n", q + 1)
        if q == -1:
            break
        parts.append(text[start:q])
        start = q
    parts.append(text[start:])
    return parts


def _join(batch: list[list[int]], ends: list[bool], eos: int) -> tuple[np.ndarray, int]:
    flat: list[int] = []
    for ids, end in zip(batch, ends):
        flat += ids
        if end:
            flat.append(eos)
    return np.array(flat, dtype=np.int64), sum(ends)


def _serial(tok: Tokenizer, pieces: Iterable[tuple[str, bool]], specials: bool) -> Iterator[tuple[np.ndarray, int]]:
    """The reference: whole pieces, encoded one batch at a time in this thread."""
    batch: list[tuple[str, bool]] = []
    chars = 0

    def flush():
        if tok.kind == "char":
            encoded = [tok.encode_array(t, specials) for t, _ in batch]
        else:
            encoded = [np.asarray(ids, dtype=np.int64) for ids in tok.encode_batch([t for t, _ in batch], specials)]
        parts = []
        for ids, (_, doc_end) in zip(encoded, batch):
            parts.append(ids)
            if doc_end:
                parts.append(np.array([tok.eos_id], dtype=np.int64))
        return np.concatenate(parts) if parts else np.empty(0, np.int64), sum(d for _, d in batch)

    for text, doc_end in pieces:
        batch.append((text, doc_end))
        chars += len(text)
        if chars >= SERIAL_BATCH_CHARS or len(batch) >= 4096:
            yield flush()
            batch, chars = [], 0
    if batch:
        yield flush()


def _batches(pieces: Iterable[tuple[str, bool]], size: int | None) -> Iterator[tuple[list[str], list[bool]]]:
    texts: list[str] = []
    ends: list[bool] = []
    chars = 0
    for text, doc_end in pieces:
        parts = cut(text, size) if size else [text]
        texts += parts
        ends += [False] * (len(parts) - 1) + [doc_end]
        chars += len(text)
        if chars >= BATCH_CHARS or len(texts) >= BATCH_PIECES:
            yield texts, ends
            texts, ends, chars = [], [], 0
    if texts:
        yield texts, ends


def encode_stream(tok: Tokenizer, pieces: Iterable[tuple[str, bool]], parallel: bool = True,
                  specials: bool = False) -> Iterator[tuple[np.ndarray, int]]:
    """Yield (token ids with eos after each document, number of documents) per batch, in input order.
    specials=False: special-token strings in the text ("<|endoftext|>") are plain text, so the only special
    ids are the eos tokens put between documents here."""
    if not parallel or tok.kind == "char":  # char: a vectorised lookup, already far faster than any BPE
        yield from _serial(tok, pieces, specials)
        return
    size = CHUNK_CHARS if tok.cuts_before_newlines() else None
    pool = ThreadPoolExecutor(1, thread_name_prefix="gptforge-encode")
    pending: deque = deque()
    try:
        for texts, ends in _batches(pieces, size):
            pending.append((pool.submit(tok.encode_batch, texts, specials), ends))
            if len(pending) > IN_FLIGHT:
                future, ends = pending.popleft()
                yield _join(future.result(), ends, tok.eos_id)
        while pending:
            future, ends = pending.popleft()
            yield _join(future.result(), ends, tok.eos_id)
    finally:  # also on an error or an early close: nothing left running
        pool.shutdown(wait=True, cancel_futures=True)
