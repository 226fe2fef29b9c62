"""Where data comes from: ONE set of rules for `prepare`, `train-tokenizer`, SFT and DPO.

Each input item (``--input`` of prepare, ``--data.path`` of the training stages) is, in this order:
  hf:NAME[:CONFIG]  a Hugging Face hub dataset (streamed, split --hf-split, default train)
  an existing path  a folder saved with ``datasets.save_to_disk`` (read with `datasets`); another folder:
                    its files with the suffixes the reader wants, recursively, sorted; a file: read by
                    its suffix (below)
  a glob            (holds * ? or [) the files and folders it matches, sorted (** recurses)
  a comma list      "a.jsonl,b.jsonl", "a.txt,dir/*.txt": split at commas, each part read by these rules
                    (a glob holding a comma that matches files as a whole is that glob)
``~`` is expanded in every item. Names starting with "." (hidden files and folders) are skipped in
folder walks, as globs skip them. Folder walks and ``**`` follow links to folders but visit each real
folder once (a link loop ends), and each real file is read once however many links, globs and list items
name it. A file's kind comes from its suffix: .jsonl/.json JSON, .parquet/.csv/
.arrow a Hugging Face builder, anything else plain UTF-8 text (the record readers read it as JSONL).
A JSON file whose first non-blank character is "[" is one JSON array (read whole; records named
``file[i]``); any other JSON file is JSONL, one value per line, blank lines skipped (records ``file:line``).

`iter_texts()` streams sources as (text, ends_document) pieces for tokenizing, never holding a whole
file in memory (a text file comes in ~1 MiB pieces cut after a newline; JSONL one record at a time).
`iter_values()` yields (where, JSON value or dataset row) for the record readers (records.py).
"""

from __future__ import annotations

import codecs
import fnmatch
import glob
import json
import os
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from gptforge.errors import UserError

JSON_SUFFIXES = (".jsonl", ".json")
HF_FILE_SUFFIXES = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
TEXT_FOLDER_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")  # what a folder contributes to prepare
RECORD_FOLDER_SUFFIXES = JSON_SUFFIXES  # ... and to SFT / DPO
CHUNK_BYTES = 1 << 20
Progress = Callable[[int], None]
# where, why -> None: a bad JSON line is handed to it and skipped (no handler: UserError)
OnBad = Callable[[str, str], None]


@dataclass(frozen=True)
class Source:
    """One input. kind: text | json (JSONL or a JSON array) | hf_disk (save_to_disk) | hf_files | hf_hub."""

    kind: str
    path: str
    field: str = "text"
    split: str = "train"

    def size(self) -> int | None:
        """Bytes on disk for files (for progress and cache keys); None for datasets."""
        return os.path.getsize(self.path) if self.kind in ("text", "json", "hf_files") else None

    @property
    def is_dataset(self) -> bool:
        return self.kind.startswith("hf_")


def _is_hf_saved(d: Path) -> bool:
    return any((d / f).is_file() for f in ("dataset_info.json", "dataset_dict.json", "state.json"))


def _file_source(p: Path, field: str, split: str) -> Source:
    suffix = p.suffix.lower()
    kind = "json" if suffix in JSON_SUFFIXES else "hf_files" if suffix in HF_FILE_SUFFIXES else "text"
    return Source(kind, str(p), field, split)


def _entries(folder: str, hidden: bool = False) -> list[os.DirEntry]:
    """The folder's entries (those named ".*" only if `hidden`), sorted by name ([] if it cannot be listed)."""
    try:
        with os.scandir(folder or ".") as it:
            return sorted((e for e in it if hidden or not e.name.startswith(".")), key=lambda e: e.name)
    except OSError:
        return []


def _folders(top: str, seen: set) -> Iterator[str]:
    """`top` and every folder below it, hidden names skipped. Links to folders are followed, but each real folder
    (device, inode) is visited once per `seen`, so a link loop ends and a linked folder is not walked twice."""
    stack = [top]
    while stack:  # depth first, without recursion (a deep tree is no error)
        d = stack.pop()
        try:
            st = os.stat(d or ".")
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode) or (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        yield d
        stack += reversed([os.path.join(d, e.name) for e in _entries(d) if e.is_dir()])


def _walk(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """The folder's files with those suffixes, recursively, sorted, hidden names skipped."""
    return sorted(Path(d, e.name) for d in _folders(str(folder), set()) for e in _entries(d)
                  if e.is_file() and Path(e.name).suffix.lower() in suffixes)


def _glob(pattern: str) -> list[str]:
    """glob.glob(pattern, recursive=True) without its endless walks: `**` visits each real folder once (see
    _folders). Names starting with "." match only a pattern part that starts with "." too."""
    parts = pattern.split(os.sep)
    first = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    top = os.sep.join(parts[:first]) if first else ""
    if pattern.startswith(os.sep) and not top:
        top = os.sep
    found: set[str] = set()
    _match(top, parts[first:], 0, {}, found)
    return sorted(found - {""})


def _match(d: str, parts: list[str], depth: int, seen: dict[int, set], found: set[str]) -> None:
    """Add to `found` what parts[depth:] matches below folder `d`; seen: the folders each `**` (by depth) walked."""
    if depth == len(parts):
        found.add(d)
        return
    part, last = parts[depth], depth == len(parts) - 1
    if part == "**":
        for sub in _folders(d, seen.setdefault(depth, set())):
            if last:
                found.update(os.path.join(sub, e.name) for e in _entries(sub))
            _match(sub, parts, depth + 1, seen, found)
        return
    if not glob.has_magic(part):
        path = os.path.join(d, part)
        if os.path.lexists(path) and (last or os.path.isdir(path)):
            _match(path, parts, depth + 1, seen, found)
        return
    for name in fnmatch.filter([e.name for e in _entries(d, hidden=part.startswith("."))], part):
        path = os.path.join(d, name)
        if last or os.path.isdir(path):
            _match(path, parts, depth + 1, seen, found)


def resolve_inputs(inputs: str | Path | Iterable[str | Path], field: str = "text", split: str = "train",
                   suffixes: tuple[str, ...] = TEXT_FOLDER_SUFFIXES, flag: str = "--input") -> list[Source]:
    """What the user typed -> Sources, in a deterministic order (the rules are in the module doc).

    suffixes: the files a folder contributes; flag: the option named in error messages."""
    items = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    items = [str(i) for i in items if str(i)]
    if not items:
        raise UserError(f"no input given; pass {flag} FILE_OR_DIR_OR_GLOB")
    sources: list[Source] = []
    for item in items:
        if item.startswith("hf:"):
            sources.append(Source("hf_hub", item[3:], field, split))
            continue
        p, magic = Path(item).expanduser(), any(c in item for c in "*?[")
        if p.is_dir():
            if _is_hf_saved(p):
                sources.append(Source("hf_disk", str(p), field, split))
                continue
            files = _walk(p, suffixes)
            if not files:
                raise UserError(f"folder '{p}' holds no {', '.join(suffixes)} files; point {flag} at your data")
            sources += [_file_source(f, field, split) for f in files]
        elif p.is_file():
            sources.append(_file_source(p, field, split))
        elif magic and (matches := _glob(os.path.expanduser(item))):
            sources += resolve_inputs(matches, field, split, suffixes, flag)
        elif "," in item:  # a comma list (before a glob: "a.txt,dir/*.txt" is a file and a glob)
            sources += resolve_inputs(item.split(","), field, split, suffixes, flag)
        elif magic:
            raise UserError(f"input glob '{item}' matches no files; check the pattern (quote it in the shell)")
        else:
            raise UserError(f"input '{item}' not found; give an existing file, folder or glob "
                            f"(or hf:NAME for a Hugging Face hub dataset)")
    return _unique(sources)


def _unique(sources: list[Source]) -> list[Source]:
    """Each file once, at its first place, however many links, globs and folders reach it (a file read twice
    would weigh double, or land in both train and val)."""
    seen: set[str] = set()
    out = []
    for src in sources:
        key = src.path if src.kind == "hf_hub" else os.path.realpath(src.path)
        if key not in seen:
            seen.add(key)
            out.append(src)
    return out


# ---- plain text -------------------------------------------------------------------------------------
def _iter_text_file(path: str, progress: Progress) -> Iterator[tuple[str, bool]]:
    """~1 MiB pieces of a UTF-8 text file, each cut just after a newline when there is one."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    carry, done, yielded, lines = b"", 0, False, 0
    with open(path, "rb") as f:
        while True:
            block = f.read(CHUNK_BYTES)
            data = carry + block
            cut = data.rfind(b"\n") + 1 if block else len(data)
            if block and cut == 0 and len(data) < 8 * CHUNK_BYTES:  # no newline yet: read on (bounded)
                carry = data
                continue
            cut = cut or len(data)
            carry = data[cut:]
            try:
                text = decoder.decode(data[:cut], final=not block)
            except UnicodeDecodeError as e:
                line = lines + data[:max(e.start, 0)].count(b"\n") + 1
                raise UserError(f"{path}:{line}: not UTF-8 text (byte {done + e.start}); convert it, e.g. "
                                f"iconv -f latin1 -t utf-8") from None
            lines += data[:cut].count(b"\n")
            done += cut
            progress(cut)
            if not block:
                if text or yielded:  # close the document (text may be empty if the last piece ended it)
                    yield text, True
                return
            if text:
                yielded = True
                yield text, False


# ---- JSON: an array or JSONL ------------------------------------------------------------------------
def _bad(on_bad: OnBad | None, hint: str, where: str, why: str) -> None:
    if on_bad is None:
        raise UserError(f"{where}: {why}; {hint}")
    on_bad(where, why)


def iter_json(path: str, on_bad: OnBad | None = None, hint: str = "fix or remove that line",
              progress: Progress | None = None) -> Iterator[tuple[str, object]]:
    """(where, value) for every value of a JSON array ('file[i]') or JSONL file ('file:line').

    A line that is not UTF-8 or not JSON goes to on_bad(where, why) and is skipped (an invalid array
    skips the whole file); without on_bad it raises UserError 'where: why; hint'."""
    progress = progress or (lambda n: None)
    with open(path, "rb") as f:
        is_array = f.read(4096).removeprefix(codecs.BOM_UTF8).lstrip().startswith(b"[")
        f.seek(0)
        if is_array:
            raw = f.read()
            progress(len(raw))
            suspect = b"\\ud" in raw.lower()  # a \\udXXX escape may be a lone surrogate
            try:
                text = raw.decode("utf-8-sig")
            except UnicodeDecodeError as e:
                line = raw[:e.start].count(b"\n") + 1
                if on_bad is None:
                    return _bad(on_bad, hint, f"{path}:{line}", f"not valid UTF-8 (byte {e.start})")
                # skipping: undecodable bytes become lone surrogates; only the records holding them are bad
                text = raw.decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")
                suspect = True
            try:
                items = json.loads(text)
            except json.JSONDecodeError as e:
                return _bad(on_bad, hint, f"{path}:{e.lineno}",
                            f"invalid JSON ({e.msg} at column {e.colno}); the whole file is skipped")
            if not isinstance(items, list):  # e.g. '[1] [2]' is caught above; a top-level '[' is always a list
                return _bad(on_bad, hint, path, "not a JSON array; the whole file is skipped")
            for i, value in enumerate(items):
                if suspect and _has_surrogates(value):
                    _bad(on_bad, hint, f"{path}[{i}]", "not valid UTF-8 text (undecodable bytes or a lone surrogate)")
                    continue
                yield f"{path}[{i}]", value
            return
        for lineno, raw in enumerate(f, 1):
            progress(len(raw))
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError:
                _bad(on_bad, hint, f"{path}:{lineno}", "not valid UTF-8")
                continue
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                _bad(on_bad, hint, f"{path}:{lineno}", f"invalid JSON ({e.msg} at column {e.colno})")
                continue
            if b"\\ud" in raw.lower() and _has_surrogates(value):  # only an escape makes one in valid UTF-8
                _bad(on_bad, hint, f"{path}:{lineno}", "not valid text (a lone surrogate escape such as \\ud800)")
                continue
            yield f"{path}:{lineno}", value


def _has_surrogates(value) -> bool:
    """Does a JSON value hold lone surrogates: bytes that were not UTF-8 (decoded with surrogateescape) or
    \\ud800-style escapes? Neither is text (encoding it would fail later)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
            return False
        except UnicodeEncodeError:
            return True
    if isinstance(value, dict):
        return any(_has_surrogates(k) or _has_surrogates(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_surrogates(v) for v in value)
    return False


# ---- Hugging Face datasets ----------------------------------------------------------------------------
def _no_remote_code(datasets) -> dict[str, bool]:
    """`trust_remote_code=False` where `load_dataset` still has that switch (datasets 2.16 to 3.x, where the
    HF_DATASETS_TRUST_REMOTE_CODE variable could turn loading scripts on); from 4.0 scripts never run."""
    import inspect

    has_switch = "trust_remote_code" in inspect.signature(datasets.load_dataset).parameters
    return {"trust_remote_code": False} if has_switch else {}


def _load_hf(src: Source):
    try:
        import datasets  # heavy and optional: only when a dataset is read
    except ImportError:
        raise UserError("reading Hugging Face datasets needs the 'datasets' package: "
                        "pip install 'gptforge[hf]' (or pip install datasets)") from None
    try:
        if src.kind == "hf_disk":
            ds = datasets.load_from_disk(src.path)
            if isinstance(ds, datasets.DatasetDict):
                if src.split not in ds:
                    raise UserError(f"{src.path}: no split '{src.split}' (splits: {', '.join(ds)}); "
                                    f"choose one with --hf-split")
                ds = ds[src.split]
            return ds
        no_code = _no_remote_code(datasets)
        if src.kind == "hf_files":
            builder = HF_FILE_SUFFIXES[Path(src.path).suffix.lower()]
            return datasets.load_dataset(builder, data_files=src.path, split="train", **no_code)
        name, _, config = src.path.partition(":")
        return datasets.load_dataset(name, config or None, split=src.split, streaming=True, **no_code)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"cannot load dataset '{src.path}': {str(e).splitlines()[0] if str(e) else type(e).__name__}; "
                        f"check the name/path (and network for hub datasets)") from None


def iter_rows(src: Source, column: str | None = None) -> Iterator[tuple[str, object]]:
    """('path[row i]', row) of a dataset: the row as a dict, or only its `column` (which must exist)."""
    ds = _load_hf(src)
    columns = ds.column_names
    if column is not None and columns is not None and column not in columns:
        raise UserError(f"dataset '{src.path}' has no field '{column}' (fields: {', '.join(columns)}); "
                        f"choose one with --field")
    i = 0
    for batch in ds.iter(batch_size=1000):
        rows = batch[column] if column is not None else [dict(zip(batch, vals)) for vals in zip(*batch.values())]
        for row in rows:
            yield f"{src.path}[row {i}]", row
            i += 1


def iter_values(src: Source, on_bad: OnBad | None = None, hint: str = "fix or remove that line",
                progress: Progress | None = None) -> Iterator[tuple[str, object]]:
    """(where, value) of every record of a source: JSON values (any plain file is read as JSON) or rows."""
    if src.is_dataset:
        return iter_rows(src)
    return iter_json(src.path, on_bad, hint, progress)


# ---- text for tokenizing ------------------------------------------------------------------------------
def _json_text(value, field: str, where: str) -> str:
    if isinstance(value, str):
        return value
    if not isinstance(value, dict):
        raise UserError(f"{where}: expected a JSON object with field '{field}', got {type(value).__name__}")
    if field not in value:
        raise UserError(f"{where}: no field '{field}' (fields: {', '.join(map(str, value)) or 'none'}); "
                        f"choose one with --field")
    text = value[field]
    if not isinstance(text, str):
        raise UserError(f"{where}: field '{field}' is {type(text).__name__}, not text; choose another with --field")
    return text


def iter_texts(sources: list[Source], progress: Progress | None = None) -> Iterator[tuple[str, bool]]:
    """Stream all sources as (text, ends_document) pieces. `progress(n)` is told of bytes consumed."""
    progress = progress or (lambda n: None)
    for src in sources:
        if src.kind == "text":
            yield from _iter_text_file(src.path, progress)
            continue
        if src.is_dataset:
            values = iter_rows(src, column=src.field)
        else:
            values = iter_json(src.path, progress=progress)
        for where, value in values:
            if src.is_dataset and not isinstance(value, str):
                raise UserError(f"{where}: field '{src.field}' is not text; choose another with --field")
            text = _json_text(value, src.field, where)
            if src.is_dataset:
                progress(len(text))
            if text:
                yield text, True
