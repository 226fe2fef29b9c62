"""Checkpoints: one format for one device and many (torch.distributed.checkpoint, DCP), so a run
saved on N ranks resumes on M. Written atomically (a `.partial` dir renamed when complete), last K
kept. Metadata is unpickled with an allow-list; tensors load with weights_only."""

from __future__ import annotations

import base64
import json
import os
import pickle
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from gptforge.errors import UserError
from gptforge.model.gpt import GPTConfig, build_model
from gptforge.parallel.mesh import barrier

STATE_FILE = "trainer_state.json"  # written last: its presence marks a complete checkpoint
_STEP_RE = re.compile(r"^step_(\d+)$")


# ---- safe metadata ----------------------------------------------------------------------------
class _SafeUnpickler(pickle.Unpickler):
    """DCP's .metadata is a pickle; allow only the plain data classes it is made of."""

    ALLOWED = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
               ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("builtins", "set")}

    def find_class(self, module, name):
        ok = (module.startswith("torch.distributed.checkpoint.") or (module, name) in self.ALLOWED
              or (module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout))))
        if not ok:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from checkpoint metadata")
        return super().find_class(module, name)


class SafeFileSystemReader(FileSystemReader):
    def read_metadata(self, *args, **kwargs):
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            metadata = _SafeUnpickler(f).load()
        from torch.distributed.checkpoint.metadata import StorageMeta

        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


# ---- helpers ----------------------------------------------------------------------------------
def rng_state() -> dict:
    st = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if torch.cuda.is_available():
        st["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(torch.from_numpy(np.frombuffer(base64.b64decode(st["torch"]), dtype=np.uint8).copy()))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.from_numpy(np.frombuffer(base64.b64decode(st["cuda"]), dtype=np.uint8).copy()))


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints under out_dir/checkpoints, oldest first."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_RE.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def checkpoint_dir_of(path: str | Path) -> Path:
    """A checkpoint dir, or a run dir (-> its latest checkpoint)."""
    p = Path(path)
    if (p / STATE_FILE).is_file():
        return p
    found = list_checkpoints(p)
    if found:
        return found[-1]
    if not p.exists():
        raise UserError(f"checkpoint '{p}' does not exist; pass a checkpoint dir or a run's out_dir")
    raise UserError(f"'{p}' holds no complete checkpoint ({STATE_FILE} missing); it may be an interrupted save")


def read_json(ckpt: Path, name: str) -> dict:
    f = ckpt / name
    try:
        return json.loads(f.read_text())
    except FileNotFoundError:
        raise UserError(f"checkpoint '{ckpt}' is incomplete: {name} is missing") from None
    except json.JSONDecodeError as e:
        raise UserError(f"checkpoint '{ckpt}' is corrupt: {name} is not valid JSON ({e.msg})") from None


# ---- save -------------------------------------------------------------------------------------
def save_checkpoint(out_dir: str | Path, step: int, model, optimizer, trainer_state: dict, env,
                    files: dict[str, str | bytes], keep_last: int = 2) -> Path:
    """All ranks call this. `files`: small files (config, tokenizer) written by rank 0 beside the tensors."""
    root = Path(out_dir) / "checkpoints"
    final = root / f"step_{step:07d}"
    partial = root / f"step_{step:07d}.partial"
    if env.is_main:
        root.mkdir(parents=True, exist_ok=True)
        if partial.exists():
            shutil.rmtree(partial)
    barrier(env)
    msd, osd = get_state_dict(model, optimizer) if optimizer is not None else (get_model_state_dict(model), None)
    state = {"model": msd} | ({"optim": osd} if osd is not None else {})
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state, checkpoint_id=str(partial))
    # every rank writes its own RNG state: exact resume at the same world size
    (partial / f"rng_{env.rank}.json").write_text(json.dumps(rng_state()))
    barrier(env)
    if env.is_main:
        for name, content in files.items():
            (partial / name).write_bytes(content if isinstance(content, bytes) else content.encode())
        (partial / STATE_FILE).write_text(json.dumps(trainer_state | {"world_size": env.world_size}, indent=2))
        _fsync_dir(partial)
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        _fsync_dir(root)
        for old in list_checkpoints(out_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier(env)
    return final


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


# ---- load -------------------------------------------------------------------------------------
def _dcp_load(state: dict, ckpt: Path) -> None:
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, storage_reader=SafeFileSystemReader(str(ckpt)))
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - all mean an unusable checkpoint
        msg = " ".join(str(e).split())[:200] or type(e).__name__
        raise UserError(f"checkpoint '{ckpt}' is corrupt or truncated ({msg}); "
                        "resume from an earlier one or delete it") from None


def load_checkpoint(ckpt: Path, model, optimizer, env) -> dict:
    """Restore model (+ optimizer, + RNG when the world size matches); returns trainer_state."""
    ts = read_json(ckpt, STATE_FILE)
    if optimizer is not None:
        msd, osd = get_state_dict(model, optimizer)
        state = {"model": msd, "optim": osd}
        _dcp_load(state, ckpt)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    else:
        state = {"model": get_model_state_dict(model)}
        _dcp_load(state, ckpt)
        set_model_state_dict(model, state["model"])
    rng = ckpt / f"rng_{env.rank}.json"
    if ts.get("world_size") == env.world_size and rng.is_file():
        set_rng_state(json.loads(rng.read_text()))
    return ts


def load_model_weights(ckpt: Path, model) -> None:
    """Weights only (inference, init_from) into a plain, unwrapped model."""
    state = {"model": get_model_state_dict(model, options=StateDictOptions(strict=True))}
    _dcp_load(state, ckpt)
    set_model_state_dict(model, state["model"])


def model_config(ckpt: Path):
    """The GPTConfig saved with a checkpoint (model_config.json), validated."""
    try:
        return GPTConfig(**read_json(ckpt, "model_config.json")).complete()
    except (TypeError, ValueError) as e:
        raise UserError(f"checkpoint '{ckpt}' has an invalid model_config.json ({e})") from None


def load_model(ckpt: Path, device: str | torch.device = "cpu", mcfg=None):
    """A plain GPT with the checkpoint's weights on `device` (inference, export)."""
    model = build_model(mcfg or model_config(ckpt), device)
    load_model_weights(ckpt, model)
    return model
