"""Every training setting checked before anything is built: check_config runs each section's own check()
(config.schema: ranges, choices and the rules between a section's keys, as one line naming the config key;
the model's shape: GPTConfig.validate() in gptforge.model.gpt, which also guards every checkpoint's config),
from parse_config and again after a resume restores a run's recipe; check_run_paths checks the folders a run
writes (out_dir, the cache) before the run starts."""

from __future__ import annotations

from pathlib import Path

from gptforge.config.schema import Config
from gptforge.data.corpus import checked_cache_dir, check_writable
from gptforge.data.sources import RECORD_FOLDER_SUFFIXES, TEXT_FOLDER_SUFFIXES, resolve_inputs
from gptforge.errors import UserError


def check_config(cfg: Config) -> Config:
    """Every section's check (the model's first); UserError naming the config key and the fix. -> cfg."""
    try:
        cfg.model.validate()
    except ValueError as e:
        raise UserError(str(e)) from None
    for section in (cfg.train, cfg.data, cfg.parallel, cfg.sft, cfg.dpo, cfg.grpo, cfg.lora, cfg.distill):
        section.check()
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
