"""Checkpoints: one format for one device and many (torch.distributed.checkpoint, DCP), so a run
saved on N ranks resumes on M. Written atomically (a `.partial` dir renamed when complete), last K
kept. Loading never runs code from the checkpoint (gptforge.checkpoint.safe_load)."""

from __future__ import annotations

import base64
import importlib
import hashlib
import json
import secrets
import shutil
import socket
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from gptforge.checkpoint.commit import (  # noqa: F401
    STATE_FILE, PendingSave, list_checkpoints, rotate, run_checkpoints, state_nbytes)
from gptforge.errors import UserError
from gptforge.lora import has_lora, is_adapter_key
from gptforge.model.gpt import GPTConfig, build_model
from gptforge.parallel.mesh import all_true, barrier, broadcast_object, on_main
from gptforge.parallel.parallelize import unwrap



# DCP warns from its background (async_save) thread too, where a catch_warnings block does not reach
warnings.filterwarnings("ignore", message="torch.distributed is disabled")


class _Lazy:
    """A module imported on first use. torch.distributed.checkpoint brings DTensor, FSDP and sympy: ~45 MiB that a
    fresh single-process run need not hold while it trains (it is imported at the first save)."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str):
        return getattr(importlib.import_module(self._name), attr)


dcp = _Lazy("torch.distributed.checkpoint")
_sd = _Lazy("torch.distributed.checkpoint.state_dict")
_api = _Lazy("torch.distributed.checkpoint.api")


# ---- helpers ----------------------------------------------------------------------------------
def _sd_options(model, **kw):
    """The state-dict options of every save and load: a model with LoRA adapters (gptforge.lora) saves and loads
    only its trainable parameters, the adapters; its frozen base comes from the base its lora.json names."""
    if has_lora(model):
        kw |= {"ignore_frozen_params": True, "strict": False}
    return _sd.StateDictOptions(**kw)


def _adapters_only(model, msd: dict) -> dict:
    """A LoRA model's state dict cut to its adapters and trained embedding rows: torch's ignore_frozen_params keeps
    a frozen weight that is tied (lm_head.weight, the embedding: the largest matrix of the base)."""
    return {k: v for k, v in msd.items() if is_adapter_key(k)} if has_lora(model) else msd


def rng_state() -> dict:
    st = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if torch.cuda.is_available():
        st["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(torch.from_numpy(np.frombuffer(base64.b64decode(st["torch"]), dtype=np.uint8).copy()))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.from_numpy(np.frombuffer(base64.b64decode(st["cuda"]), dtype=np.uint8).copy()))


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


# ---- agreement between ranks and nodes ----------------------------------------------------------------
def storage_is_shared(out_dir: str | Path, env) -> bool:
    """Do all ranks see the same out_dir? Rank 0 writes a random token there and every rank looks for it:
    true on one node or a shared filesystem, false on machines with disks of their own."""
    if not env.distributed:
        return True
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    token = broadcast_object(secrets.token_hex(8) if env.is_main else None, env)
    probe = root / f".gptforge-probe-{token}"
    if env.is_main:
        probe.write_text(token)
    barrier(env)
    try:
        seen = probe.read_text() == token
    except OSError:
        seen = False
    shared = all_true(seen, env)
    barrier(env)
    if env.is_main:
        probe.unlink(missing_ok=True)
    return shared


def resume_candidates(resume: str, out_dir: str | Path, env) -> list[Path]:
    """The checkpoints to try, newest first, as rank 0 sees them: every rank resumes from the same one."""
    def pick() -> list[str]:
        found = list_checkpoints(out_dir) if resume == "auto" else [checkpoint_dir_of(resume)]
        return [str(p) for p in reversed(found)]

    return [Path(p) for p in on_main(pick, env)]


def read_json_rank0(ckpt: Path, name: str, env) -> dict:
    """read_json on rank 0 (whose disk holds every checkpoint), the result on every rank."""
    return on_main(lambda: read_json(ckpt, name), env)


def require_everywhere(ckpt: Path, env) -> None:
    """A sharded checkpoint is read by every rank: one clear error naming the nodes that lack it."""
    here = (ckpt / STATE_FILE).is_file()
    if all_true(here, env):
        return
    seen = [None] * env.world_size
    dist.all_gather_object(seen, (env.rank, socket.gethostname(), here))
    missing = ", ".join(f"rank {r} on {host}" for r, host, ok in seen if not ok)
    raise UserError(f"checkpoint '{ckpt}' is sharded over all ranks but {missing} cannot see it; resume on "
                    "the machines that saved it (same shared folder), or from a checkpoint saved without one")


# ---- save -------------------------------------------------------------------------------------
def save_checkpoint(out_dir: str | Path, step: int, model, optimizer, trainer_state: dict, env,
                    files: dict[str, str | bytes], keep_last: int = 2, shared: bool = True,
                    replicas: bool = False, extra: dict | None = None) -> Path:
    """All ranks call this. `files`: small files (config, tokenizer) written by rank 0 beside the tensors.
    shared (all ranks see out_dir): every rank writes its shards (DCP, reshardable). Not shared (each
    machine has its own disk): the full state is gathered to rank 0, which alone writes it, so node 0 holds
    a complete checkpoint and resumes broadcast it to the others. replicas: every rank has an optimizer
    state of its own (local SGD), saved per rank; extra: tensors that are the same on every rank."""
    return begin_save(out_dir, step, model, optimizer, trainer_state, env, files, keep_last, shared, replicas,
                      extra).finish()


def begin_save(out_dir, step, model, optimizer, trainer_state, env, files, keep_last=2, shared=True,
               replicas=False, extra=None, async_group=None) -> PendingSave:
    """Write the tensors into step_N.partial; with `async_group` (a CPU process group, or True on one process)
    DCP writes them in the background from a copy. PendingSave.finish() completes the checkpoint."""
    root = Path(out_dir) / "checkpoints"
    fmt = "sharded" if shared or not env.distributed else "full"
    pending = PendingSave(root, step, env, trainer_state | {"world_size": env.world_size, "format": fmt,
                                                            "replicas": replicas}, files, keep_last)
    if env.is_main:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob("step_*.partial"):  # this save's, or one a crash left behind: never useful
            shutil.rmtree(stale, ignore_errors=True)
    barrier(env)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            pending.future = _write_tensors(pending, model, optimizer, fmt, replicas, extra or {}, async_group)
    except (Exception, _api.CheckpointException) as e:  # noqa: BLE001 - DCP's is a BaseException; all ranks agree below
        pending.error = e
    if pending.future is None:
        pending.agree()
    return pending


def _write_tensors(pending: PendingSave, model, optimizer, fmt: str, replicas: bool, extra: dict, async_group):
    partial, env = pending.partial, pending.env
    if replicas:
        _save_replicas(partial, model, optimizer, env, fmt, extra)
    elif fmt == "sharded":
        opts = _sd_options(model)
        msd, osd = (_sd.get_state_dict(model, optimizer, options=opts) if optimizer is not None
                    else (_sd.get_model_state_dict(model, options=opts), None))
        msd = _adapters_only(model, msd)
        state = {"model": msd} | ({"optim": osd} if osd is not None else {})
        pending.nbytes = state_nbytes(state)
        if async_group is not None:
            partial.mkdir(parents=True, exist_ok=True)
            (partial / f"rng_{env.rank}.json").write_text(json.dumps(rng_state()))
            pg = async_group if env.distributed else None
            return dcp.async_save(state, checkpoint_id=str(partial), process_group=pg)
        dcp.save(state, checkpoint_id=str(partial))
    else:
        msd, osd = _sd.get_state_dict(model, optimizer, options=_sd_options(model, full_state_dict=True, cpu_offload=True))
        msd = _adapters_only(model, msd)
        pending.nbytes = state_nbytes({"model": msd, "optim": osd})
        if env.is_main:
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(partial), no_dist=True)
        del msd, osd
    if fmt == "sharded":  # every rank writes its own RNG state: exact resume at the same world size
        (partial / f"rng_{env.rank}.json").write_text(json.dumps(rng_state()))
    else:
        rngs = [None] * env.world_size
        dist.all_gather_object(rngs, rng_state())
        for r, st in enumerate(rngs if env.is_main else []):
            (partial / f"rng_{r}.json").write_text(json.dumps(st))
    return None


# ---- load -------------------------------------------------------------------------------------
def _dcp_load(state: dict, ckpt: Path, no_dist: bool = False) -> None:
    """Every load of tensors goes through here: gptforge.checkpoint.safe_load's reader and planner (no code runs)."""
    from gptforge.checkpoint.safe_load import (SafeFileSystemReader, SafeLoadPlanner, UnsafeCheckpoint, describe,
                                               failure_of)
    try:
        reader = SafeFileSystemReader(str(ckpt))
        reader.check()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner(),
                     no_dist=no_dist)
    except (Exception, _api.CheckpointException) as e:  # noqa: BLE001 - all mean an unusable checkpoint
        if isinstance(failure := failure_of(e), UnsafeCheckpoint):
            raise UserError(f"checkpoint '{ckpt}' is refused: {failure}; gptforge never writes that, so it was "
                            "crafted or altered: nothing from it was loaded or run") from None
        raise UserError(f"checkpoint '{ckpt}' is corrupt or truncated: {describe(e)}; "
                        "resume from an earlier one or delete it") from None


def load_checkpoint(ckpt: Path, model, optimizer, env, extra: dict | None = None) -> dict:
    """Restore model + optimizer (+ RNG when the world size matches) on every rank; returns trainer_state.
    The checkpoint is the one rank 0 names (all ranks call this with the same path). `extra`: tensors to
    fill in place (see save_checkpoint)."""
    ts = on_main(lambda: read_json(ckpt, STATE_FILE), env)
    if ts.get("replicas"):
        if ts.get("format") != "full" and env.distributed:
            require_everywhere(ckpt, env)
        _load_replicas(ckpt, model, optimizer, env, ts, extra or {})
    if ts.get("format", "sharded") == "full":
        if not ts.get("replicas"):
            _load_full(ckpt, model, optimizer, env)
        rngs = on_main(lambda: [json.loads(p.read_text()) if (p := ckpt / f"rng_{r}.json").is_file() else None
                               for r in range(env.world_size)], env)
        rng = rngs[env.rank] if ts.get("world_size") == env.world_size else None
    else:
        if not ts.get("replicas"):
            if env.distributed:
                require_everywhere(ckpt, env)
            opts = _sd_options(model)
            msd, osd = _sd.get_state_dict(model, optimizer, options=opts)
            msd = _adapters_only(model, msd)
            _dcp_load({"model": msd, "optim": osd}, ckpt)
            _sd.set_state_dict(model, optimizer, model_state_dict=msd, optim_state_dict=osd, options=opts)
        p = ckpt / f"rng_{env.rank}.json"
        rng = json.loads(p.read_text()) if ts.get("world_size") == env.world_size and p.is_file() else None
    if rng:
        set_rng_state(rng)
    return ts


def _load_full(ckpt: Path, model, optimizer, env) -> None:
    """Rank 0 reads the full state from its disk; the others receive it over the network."""
    offload = _sd_options(model, full_state_dict=True, cpu_offload=True)
    msd, osd = _sd.get_state_dict(model, optimizer, options=offload if env.is_main else _sd_options(model, full_state_dict=True))
    msd = _adapters_only(model, msd)
    on_main(lambda: _dcp_load({"model": msd, "optim": osd}, ckpt, no_dist=True), env)
    opts = _sd_options(model, full_state_dict=True, broadcast_from_rank0=env.distributed)
    # DDP's wrapper does not take broadcast state dicts: load into the module it wraps (same parameters)
    _sd.set_state_dict(unwrap(model), optimizer, model_state_dict=msd, optim_state_dict=osd, options=opts)


def _cpu(tree):
    """A CPU copy of a (nested) state dict: its own storage, also for tensors already on the CPU."""
    if torch.is_tensor(tree):
        return tree.detach().to("cpu", copy=True)
    if isinstance(tree, dict):
        return {k: _cpu(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_cpu(v) for v in tree)
    return tree


def _save_replicas(partial: Path, model, optimizer, env, fmt: str, extra: dict) -> None:
    """Local SGD: the (synchronised) model once, each rank's own optimizer state as optim_rank{r}."""
    osd = _sd.get_optimizer_state_dict(model, optimizer)
    if fmt == "sharded":
        dcp.save({"model": _sd.get_model_state_dict(model), f"optim_rank{env.rank}": osd, "extra": extra},
                 checkpoint_id=str(partial))
        return
    osds = [None] * env.world_size if env.is_main else None
    dist.gather_object(_cpu(osd), osds, dst=0)
    if env.is_main:
        state = {"model": _cpu(_sd.get_model_state_dict(model)), "extra": _cpu(extra)}
        dcp.save(state | {f"optim_rank{r}": o for r, o in enumerate(osds)}, checkpoint_id=str(partial), no_dist=True)


def _load_replicas(ckpt: Path, model, optimizer, env, ts: dict, extra: dict) -> None:
    """Inverse of _save_replicas; a rank beyond the saved number of replicas starts from rank 0's optimizer."""
    saved = int(ts.get("world_size", 1))
    own = lambda r: f"optim_rank{r if r < saved else 0}"  # noqa: E731
    msd, osd = _sd.get_model_state_dict(model), _sd.get_optimizer_state_dict(model, optimizer)
    if ts.get("format") != "full":
        state = {"model": msd, own(env.rank): osd, "extra": extra}
        _dcp_load(state, ckpt)
    else:
        common, mine, per_rank = None, [None], None
        if env.is_main:
            state = {"model": _cpu(msd), "extra": _cpu(extra)} | {own(r): _cpu(osd) for r in range(env.world_size)}
            _dcp_load(state, ckpt, no_dist=True)
            common, per_rank = {"model": state["model"], "extra": state["extra"]}, [state[own(r)] for r in
                                                                                    range(env.world_size)]
        if env.distributed:  # the model once to everyone, each rank only its own optimizer state
            common = broadcast_object(common, env)
            dist.scatter_object_list(mine, per_rank, src=0)
        else:
            mine = per_rank
        msd, osd = common["model"], mine[0]
        for k, v in common["extra"].items():
            extra[k].copy_(v)
    _sd.set_model_state_dict(model, msd)
    _sd.set_optimizer_state_dict(model, optimizer, osd)


def load_model_weights(ckpt: Path, model) -> None:
    """Weights only (inference, init_from) into a plain, unwrapped model."""
    opts = _sd_options(model, strict=True)
    state = {"model": _adapters_only(model, _sd.get_model_state_dict(model, options=opts))}
    _dcp_load(state, ckpt)
    _sd.set_model_state_dict(model, state["model"], options=opts)


def model_config(ckpt: Path):
    """The GPTConfig saved with a checkpoint (model_config.json), validated (GPTConfig.validate)."""
    data = read_json(ckpt, "model_config.json")
    try:
        if not isinstance(data, dict):
            raise ValueError(f"it holds a JSON {type(data).__name__}, not an object")
        return GPTConfig(**data).complete()
    except (TypeError, ValueError) as e:
        raise UserError(f"checkpoint '{ckpt}' has an invalid model_config.json: {str(e).splitlines()[0]}; "
                        "the file was altered or is not from gptforge") from None


def saved_model_config(ckpt: Path, env) -> dict:
    """model_config.json as rank 0 reads it, validated, on every rank (resume compares it to the model).
    Keys added to GPTConfig after the checkpoint was written (e.g. qk_norm) read as their defaults, which
    are the behaviour such a checkpoint was trained with."""
    def read() -> dict:
        cfg = model_config(ckpt)
        data = read_json(ckpt, "model_config.json")
        return {k: v for k, v in cfg.to_dict().items() if k not in data} | data

    return on_main(read, env)


def tokenizer_id(tokenizer_json: bytes) -> str:
    """sha256 of a tokenizer.json as canonical JSON: the same tokenizer has the same id however it was written."""
    try:
        tokenizer_json = json.dumps(json.loads(tokenizer_json), sort_keys=True, separators=(",", ":")).encode()
    except ValueError:
        pass
    return hashlib.sha256(tokenizer_json).hexdigest()


def check_same_tokenizer(ckpt: Path, tokenizer_json: bytes | None, env) -> None:
    """Resume only with the tokenizer the checkpoint was trained with (its id in trainer_state.json, or the
    id of its tokenizer.json for checkpoints saved before ids were recorded)."""
    def saved() -> str | None:
        sid = read_json(ckpt, STATE_FILE).get("tokenizer_sha256")
        f = ckpt / "tokenizer.json"
        return sid or (tokenizer_id(f.read_bytes()) if f.is_file() else None)

    have = on_main(saved, env)
    now = tokenizer_id(tokenizer_json) if tokenizer_json is not None else None
    if have and now and have != now:
        raise UserError(f"cannot resume from '{ckpt}': it was trained with another tokenizer (tokenizer.json "
                        f"sha256 {have[:12]} there, {now[:12]} now); use the data.tokenizer / data.path the run "
                        "started with, or a new train.out_dir")


def load_model(ckpt: Path, device: str | torch.device = "cpu", mcfg=None):
    """A plain GPT with the checkpoint's weights on `device` (inference, export)."""
    model = build_model(mcfg or model_config(ckpt), device)
    load_model_weights(ckpt, model)
    return model
