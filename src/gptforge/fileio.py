"""Writing output files without following a symlink planted at the destination.

A folder gptforge writes into may come from elsewhere (a downloaded model folder that `eval` scores, an
`export-hf --force` destination): a link `FOLDER/eval.json -> ~/.bashrc` must not make us overwrite the
link's target. Each file is written to a fresh temp file in the same folder (O_EXCL, never a link) and
`os.replace`d onto the name: rename replaces the link itself, not what it points to, and a reader sees the
whole old file or the whole new one.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def replace_file(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call write(tmp) to produce the file at a temp path next to `path`, then rename it onto `path`
    (a symlink there is replaced, its target untouched). For writers that only take a path (safetensors,
    tokenizers). The file gets the usual mode (0666 minus the umask), not mkstemp's 0600."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        os.close(fd)
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_file_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write text (UTF-8) or bytes to `path` atomically, never through a symlink at `path`."""
    raw = data.encode() if isinstance(data, str) else data

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(raw)

    return replace_file(path, write)
