"""Loading a checkpoint never executes code from it.

DCP's `.metadata` is a pickle. It is read by an unpickler that resolves only the exact (module, name)
pairs real gptforge checkpoints contain (single process, DDP, FSDP2/DTensor, tensor parallel, local-SGD
replicas; sharded and full formats, each enumerated from a real save; the unit test checks a
single-process one against this list), never a dotted name (pickle protocol 4 would walk `a.b` attribute
by attribute). The result is then checked field by field: every item is a tensor except the optimizer's
`param_groups` entries (floats, tuples, lists of names), which DCP stores as pickled bytes; those bytes
are read with `torch.load(weights_only=True)` (plain values only), never DCP's own `weights_only=False`.
Data files must be `__R_I.distcp` inside the checkpoint, their byte ranges inside the file (a truncated
file is named before anything is read)."""

from __future__ import annotations

import io
import os
import pickle
import re
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

_DCP = "torch.distributed.checkpoint."
# every global a real checkpoint's .metadata holds (enumerated from saves of each format), and no other
ALLOWED: frozenset[tuple[str, str]] = frozenset({
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
    (_DCP + "filesystem", "_StorageInfo"),
    *((_DCP + "metadata", n) for n in ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
                                       "TensorStorageMetadata", "ChunkStorageMetadata", "BytesStorageMetadata",
                                       "_MEM_FORMAT_ENCODING")),
})
# the one place a DCP checkpoint of ours holds non-tensor values: the optimizer's param_groups
_BYTES_FQN = re.compile(r"^optim(_rank\d+)?\.param_groups\.\d+\.\w+$")
_DATA_FILE = re.compile(r"^__\d+_\d+\.distcp$")
_PLAIN = (int, float, bool, str, type(None))


class UnsafeCheckpoint(Exception):
    """The checkpoint asks for something gptforge never writes; the message says what."""


class DamagedCheckpoint(Exception):
    """A file of the checkpoint is missing, truncated or unreadable; the message names it."""


class SafeUnpickler(pickle.Unpickler):
    """Only the exact (module, name) pairs in ALLOWED, and torch dtypes by their plain name."""

    def find_class(self, module: str, name: str):
        if "." in name:
            raise UnsafeCheckpoint(f"its .metadata asks for the dotted name {module}.{name}")
        if (module, name) in ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafeCheckpoint(f"its .metadata asks for {module}.{name}, which no gptforge checkpoint contains")


def _plain(v, depth: int = 0) -> bool:
    if isinstance(v, _PLAIN):
        return True
    if isinstance(v, (list, tuple)) and depth < 3:
        return all(_plain(x, depth + 1) for x in v)
    return False


def _check_tensor_md(fqn: str, md) -> None:
    ok = (type(md) is TensorStorageMetadata and type(md.properties) is TensorProperties
          and isinstance(md.properties.dtype, torch.dtype) and type(md.size) is torch.Size
          and isinstance(md.chunks, list)
          and all(type(c) is ChunkStorageMetadata and type(c.offsets) is torch.Size and type(c.sizes) is torch.Size
                  for c in md.chunks))
    if not ok:
        raise UnsafeCheckpoint(f"its .metadata describes '{fqn}' with a malformed {type(md).__name__}")


def check_metadata(md, ckpt: Path) -> None:
    """Every field of an unpickled Metadata has the type and shape gptforge writes; UnsafeCheckpoint if not."""
    if type(md) is not Metadata or not isinstance(md.state_dict_metadata, dict):
        raise UnsafeCheckpoint(f"its .metadata is a {type(md).__name__}, not DCP Metadata")
    for fqn, item in md.state_dict_metadata.items():
        if not isinstance(fqn, str):
            raise UnsafeCheckpoint(f"its .metadata has a non-string key {fqn!r}")
        if type(item) is BytesStorageMetadata:
            if not _BYTES_FQN.match(fqn):
                raise UnsafeCheckpoint(f"it declares '{fqn}' as pickled bytes, not a tensor (DCP would unpickle "
                                       "them with weights_only=False)")
        else:
            _check_tensor_md(fqn, item)
    if not isinstance(md.storage_data, dict):
        raise UnsafeCheckpoint("its .metadata has no storage map")
    for idx, info in md.storage_data.items():
        if type(idx) is not MetadataIndex or type(info) is not _StorageInfo:
            raise UnsafeCheckpoint("its .metadata has a malformed storage map entry")
        if not isinstance(info.relative_path, str) or not _DATA_FILE.match(info.relative_path):
            raise UnsafeCheckpoint(f"its .metadata points at the file {info.relative_path!r} (only __R_I.distcp "
                                   "files inside the checkpoint are read)")
        if type(info.offset) is not int or type(info.length) is not int or info.offset < 0 or info.length < 0:
            raise UnsafeCheckpoint(f"its .metadata gives a bad byte range for '{idx.fqn}'")
        if info.transform_descriptors:
            raise UnsafeCheckpoint(f"its .metadata asks for stream transforms {info.transform_descriptors!r} "
                                   "gptforge never writes")
    if md.planner_data is not None and not (isinstance(md.planner_data, dict) and all(
            isinstance(k, str) and _plain(v) for k, v in md.planner_data.items())):
        raise UnsafeCheckpoint("its .metadata has malformed planner data")
    if md.storage_meta is not None and type(md.storage_meta) is not StorageMeta:
        raise UnsafeCheckpoint("its .metadata has malformed storage_meta")


def check_data_files(md, ckpt: Path) -> None:
    """Each data file exists and holds the byte ranges the metadata names (UnsafeCheckpoint names the file)."""
    need: dict[str, int] = {}
    for info in md.storage_data.values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(need.items()):
        try:
            have = os.path.getsize(ckpt / name)
        except OSError:
            raise DamagedCheckpoint(f"its data file {name} is missing") from None
        if have < size:
            raise DamagedCheckpoint(f"its data file {name} is truncated ({have:,} bytes, the metadata needs "
                                   f"{size:,})")


class SafeFileSystemReader(FileSystemReader):
    """FileSystemReader whose metadata goes through SafeUnpickler and check_metadata / check_data_files.
    check() reads and checks it up front (DCP would log a traceback and try other files on an error)."""

    _checked = None

    def check(self):
        path = self._get_metadata_path(None)
        try:
            with self.fs.create_stream(path, "rb") as f:
                metadata = SafeUnpickler(f).load()
        except UnsafeCheckpoint:
            raise
        except FileNotFoundError:
            raise DamagedCheckpoint(f"its {Path(path).name} is missing") from None
        except Exception as e:  # noqa: BLE001 - a damaged pickle: truncated, garbage
            raise DamagedCheckpoint(f"its {Path(path).name} is unreadable ({type(e).__name__}: "
                                    f"{_first_line(e)})") from None
        check_metadata(metadata, Path(self.path))
        check_data_files(metadata, Path(self.path))
        self._checked = metadata
        return metadata

    def read_metadata(self, *args, **kwargs):
        metadata = self._checked or self.check()
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """param_groups values are unpickled with weights_only=True and must be plain values."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        if not _BYTES_FQN.match(fqn):
            raise UnsafeCheckpoint(f"it stores '{fqn}' as pickled bytes, not a tensor")
        obj = torch.load(value, weights_only=True)
        if not _plain(obj):
            raise UnsafeCheckpoint(f"'{fqn}' holds a {type(obj).__name__}, not a plain value")
        if self.flatten_state_dict:  # as DefaultLoadPlanner.load_bytes, without its weights_only=False
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


def _first_line(e: BaseException) -> str:
    """The first line of a message that is not part of a traceback."""
    skip = ("Traceback", "File \"", "^", "~", "CheckpointException")
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.strip().startswith(skip)]
    return lines[0][:200] if lines else type(e).__name__


def failure_of(e: BaseException) -> BaseException:
    """The exception behind DCP's CheckpointException (which carries each rank's with its traceback)."""
    for exc, *_ in getattr(e, "failures", {}).values() if hasattr(e, "failures") else ():
        return failure_of(exc)
    return e


def describe(e: BaseException) -> str:
    """One line for a failed load: our own messages as they are, others as their first meaningful line."""
    e = failure_of(e)
    if isinstance(e, (UnsafeCheckpoint, DamagedCheckpoint)):
        return str(e)
    return f"{type(e).__name__}: {_first_line(e)}"


def tensor_shapes(ckpt: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's name and shape as the checkpoint's .metadata records them, read through SafeUnpickler
    and checked (no tensor data is read): to compare a model config with the weights before building it."""
    md = SafeFileSystemReader(str(ckpt)).check()
    return {fqn: tuple(m.size) for fqn, m in md.state_dict_metadata.items() if isinstance(m, TensorStorageMetadata)}
