"""Every training setting checked where it enters: ranges and choices of the parsed Config (run by
parse_config, so a bad value is one line naming its config key before anything is built), and the
folders a run writes (out_dir, the cache) checked before the run starts. The model's shape is checked by
GPTConfig.validate() (gptforge.model.gpt), which also guards every checkpoint's config."""

from __future__ import annotations

import math
from pathlib import Path

from gptforge.config.schema import Config
from gptforge.data.corpus import checked_cache_dir, check_writable
from gptforge.data.sources import RECORD_FOLDER_SUFFIXES, TEXT_FOLDER_SUFFIXES, resolve_inputs
from gptforge.errors import UserError
from gptforge.hardware import check_device_name


def _fail(key: str, rule: str, value, fix: str = "") -> None:
    raise UserError(f"config key '{key}' must be {rule}, got {value!r}" + (f"; {fix}" if fix else ""))


def _positive(key: str, v, fix: str = "") -> None:
    if not (v > 0 and math.isfinite(v)):
        _fail(key, "a positive number", v, fix)


def _at_least(key: str, v, low: int, fix: str = "") -> None:
    if v < low:
        _fail(key, f">= {low}", v, fix)


def _in_range(key: str, v, low: float, high: float, fix: str = "", high_open: bool = True) -> None:
    ok = low <= v < high if high_open else low <= v <= high
    if not ok:
        _fail(key, f"in [{low}, {high}{')' if high_open else ']'}", v, fix)


def _finite(key: str, v) -> None:
    if not math.isfinite(v):
        _fail(key, "a finite number", v)


def check_config(cfg: Config) -> Config:
    """Ranges and choices of every section; UserError naming the config key and the fix. -> cfg."""
    try:
        cfg.model.validate()
    except ValueError as e:
        raise UserError(str(e)) from None
    t, d, p = cfg.train, cfg.data, cfg.parallel
    _positive("train.lr", t.lr, "e.g. --train.lr=3e-4")
    _in_range("train.beta1", t.beta1, 0, 1, "e.g. 0.9")
    _in_range("train.beta2", t.beta2, 0, 1, "e.g. 0.95")
    _in_range("train.min_lr_ratio", t.min_lr_ratio, 0, 1, "0.1 decays to a tenth of train.lr", high_open=False)
    _in_range("train.decay_fraction", t.decay_fraction, 0, 1, "e.g. 0.2", high_open=False)
    _positive("train.muon_lr", t.muon_lr, "e.g. 0.02 (muon_adjust_lr=original)")
    _in_range("train.muon_momentum", t.muon_momentum, 0, 1, "e.g. 0.95")
    _finite("train.muon_weight_decay", t.muon_weight_decay)
    _at_least("train.muon_weight_decay", t.muon_weight_decay, 0, "0 turns it off")
    _in_range("train.muon_ns_steps", t.muon_ns_steps, 1, 100, "e.g. 5")
    for key in ("embed_lr", "head_lr", "scalar_lr"):
        if getattr(t, key) is not None:
            _positive(f"train.{key}", getattr(t, key), "or leave it unset for train.lr")
    for key in ("weight_decay", "grad_clip"):
        v = getattr(t, key)
        _finite(f"train.{key}", v)
        _at_least(f"train.{key}", v, 0, "0 turns it off")
    for key, low in (("micro_batch", 1), ("grad_accum", 1), ("log_every", 1), ("eval_every", 0),
                     ("eval_batches", 1), ("save_every", 0), ("keep_last", 0), ("warmup_steps", 0),
                     ("sample_tokens", 0), ("prefetch", 0)):
        fix = "0 means only at the end" if low == 0 and key.endswith("_every") else ""
        _at_least(f"train.{key}", getattr(t, key), low, fix)
    for key in ("max_steps", "max_tokens", "stop_after"):
        v = getattr(t, key)
        if v is not None:
            _at_least(f"train.{key}", v, 1)
    if t.epochs is not None:
        _positive("train.epochs", t.epochs)
    check_device_name(t.device, "config key 'train.device'")
    _in_range("data.val_fraction", d.val_fraction, 0, 0.5, "e.g. 0.01")
    if d.val_path is not None and not d.val_path.strip():
        _fail("data.val_path", "a file, folder, glob or prepared dataset", d.val_path, "or leave it out")
    for key, low in (("dp_replicate", 1), ("tp", 1), ("timeout_s", 1), ("powersgd_rank", 1),
                     ("powersgd_start", 2), ("sync_every", 1)):
        _at_least(f"parallel.{key}", getattr(p, key), low)
    if p.dp_shard != -1 and p.dp_shard < 1:
        _fail("parallel.dp_shard", ">= 1 or -1 (the rest of the world size)", p.dp_shard)
    _positive("parallel.outer_lr", p.outer_lr)
    _in_range("parallel.outer_momentum", p.outer_momentum, 0, 1)
    _positive("dpo.beta", cfg.dpo.beta, "e.g. 0.1")
    _in_range("dpo.label_smoothing", cfg.dpo.label_smoothing, 0, 0.5)
    return cfg


def check_run_paths(cfg: Config, needs_cache: bool) -> None:
    """The folders the run will write, checked before anything is built (one line naming the folder)."""
    check_writable(cfg.train.out_dir, "config key 'train.out_dir':", "choose a folder you can write to")
    if cfg.data.val_path:  # before anything is built (each machine checks its own disk)
        try:
            resolve_inputs(cfg.data.val_path, field=cfg.data.field, flag="data.val_path",
                           suffixes=TEXT_FOLDER_SUFFIXES if needs_cache else RECORD_FOLDER_SUFFIXES)
        except UserError as e:
            raise UserError(f"config key 'data.val_path': {e}") from None
    if needs_cache:
        path = cfg.data.path
        if path is None or "," in path or not (Path(path).expanduser() / "meta.json").is_file():
            checked_cache_dir()  # raw inputs and the built-in corpus are prepared into the cache
