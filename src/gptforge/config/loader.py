"""Config = stage defaults <- model.preset <- config file (TOML/YAML/JSON) <- --section.key=value overrides.

Both the file and the command line are parsed by tyro (gptforge.options), the file's values passed as
`--section.key=value` strings, so both get the same types, rules and one-line errors; the file first,
so its errors name the file."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

from gptforge.config.presets import preset_model, preset_recipe
from gptforge.config.schema import RECIPE_KEYS, Config
from gptforge.config.validate import check_config
from gptforge.errors import UserError, show_value
from gptforge.model.gpt import GPTConfig
from gptforge.options import parse_options

VOCAB_MULTIPLE = 64


def round_vocab(n: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """A tokenizer's vocab rounded up to the embedding size the model gets (a multiple of 64; 128 on a GPU)."""
    return -(-n // multiple) * multiple


def load_file(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file '{p}' not found; check the path given to --config")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"config file '{p}' is not a text file (byte {e.start} is not UTF-8); give a TOML, "
                        f"YAML or JSON config to --config") from None
    except OSError as e:
        raise UserError(f"cannot read config file '{p}' ({e.strerror or e}); check the path given to --config") \
            from None
    if "\x00" in text:
        raise UserError(f"config file '{p}' is not a text file (it holds NUL bytes); give a TOML, YAML or JSON "
                        f"config to --config")
    try:
        if p.suffix == ".toml":
            if sys.version_info >= (3, 11):
                import tomllib
            else:  # Python 3.10: the same parser as the `tomli` package (a dependency there)
                import tomli as tomllib
            return tomllib.loads(text)
        if p.suffix in (".yaml", ".yml"):
            import yaml

            return yaml.safe_load(text) or {}
        if p.suffix == ".json":
            return json.loads(text)
    except Exception as e:  # noqa: BLE001 - any parse error becomes one line
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"config file '{p}' is not valid {p.suffix[1:].upper()}: {msg}") from None
    raise UserError(f"config file '{p}' must end in .toml, .yaml, .yml or .json")


def _short(value: Any) -> str:
    return show_value(value)  # bounded: never the full repr of a YAML alias bomb


def _as_arg(key: str, value: Any, where: str) -> str:
    if isinstance(value, (dict, list, tuple, set)):
        raise UserError(f"config key '{key}' {where} must be a single value, got {_short(value)}")
    if isinstance(value, bool):
        value = "true" if value else "false"
    return f"--{key}={'None' if value is None else value}"


def file_args(data: dict, where: str) -> list[str]:
    """A config file's {section: {key: value}} as --section.key=value arguments."""
    if not isinstance(data, dict):
        raise UserError(f"the config {where} must be a table of sections ([train], [model], ...), "
                        f"got a {type(data).__name__}")
    out = []
    for section, values in data.items():
        if not isinstance(values, dict):
            raise UserError(f"config section '{section}' {where} must be a table of keys, got {_short(values)}")
        out += [_as_arg(f"{section}.{k}", v, where) for k, v in values.items()]
    return out


# keys that moved to another section: the old spelling (in configs, saved config.json files and command lines
# people already have) is read as the new one, with one note on stderr
RENAMED = {"sft.overflow": "data.overflow", "sft.skip_bad_lines": "data.skip_bad_lines"}


def renamed_keys(args: list[str], used: list[str]) -> list[str]:
    """--old.key[=value] -> --new.key[=value] (RENAMED); the old keys met are appended to `used`."""
    out = []
    for i, a in enumerate(args):
        if a == "--":
            return out + args[i:]
        flag, eq, value = a.partition("=")
        old = flag[2:].replace("-", "_") if flag.startswith("--") else ""
        if old in RENAMED:
            used += [old] if old not in used else []
            a = f"--{RENAMED[old]}{eq}{value}"
        out.append(a)
    return out


def _take(argv: list[str], flag: str) -> tuple[str | None, list[str]]:
    """Remove `flag VALUE` / `flag=VALUE` (all occurrences) from argv -> (last value, rest)."""
    value, rest, i = None, [], 0
    while i < len(argv):
        a = argv[i]
        if a == flag:
            if i + 1 >= len(argv):
                raise UserError(f"{flag} needs a value")
            value, i = argv[i + 1], i + 2
            continue
        if a.startswith(flag + "="):
            value = a.split("=", 1)[1]
        else:
            rest.append(a)
        i += 1
    return value, rest


def _preset(args: list[str]) -> str | None:
    preset = None
    for a in args:
        for flag in ("--model.preset=", "--model-preset="):
            if a.startswith(flag):
                preset = a[len(flag):]
    return preset


def _with_defaults(cfg: Config, defaults: dict) -> Config:
    for section, values in defaults.items():
        setattr(cfg, section, dataclasses.replace(getattr(cfg, section), **values))
    return cfg


def parse_config(argv: list[str], defaults: dict | None = None, prog: str = "gptforge pretrain") -> Config:
    """A command line (+ stage defaults) -> Config; every user mistake raises UserError (one line)."""
    config_file, argv = _take(list(argv), "--config")
    argv = [a for a in argv]
    fargs, renamed = [], []
    if config_file and not any(a in ("-h", "--help") for a in argv):
        fargs = renamed_keys(file_args(load_file(config_file), f"in {config_file}"), renamed)
    argv = renamed_keys(argv, renamed)
    if renamed and os.environ.get("RANK", "0") == "0":  # once, not from every rank of torchrun
        print("note: " + "; ".join(f"{k} is now {RENAMED[k]}" for k in renamed), file=sys.stderr)
    cmd_args = argv[:argv.index("--")] if "--" in argv else argv
    # "--model.preset X" -> "--model.preset=X" so that the preset is found before parsing
    joined = []
    for a in cmd_args:
        if joined and joined[-1] in ("--model.preset", "--model-preset"):
            joined[-1] += "=" + a
        else:
            joined.append(a)
    argv = joined + argv[len(cmd_args):]
    defaults = defaults or {}
    preset = _preset(argv) or _preset(fargs) or defaults.get("model", {}).get("preset") or "nano"
    stage = {k: v for k, v in defaults.items() if k not in ("model", "preset_recipe")}
    base = _with_defaults(Config(model=preset_model(preset)), stage)
    if defaults.get("preset_recipe"):  # pretraining: the size's own recipe above the stage's defaults
        base = _with_defaults(base, preset_recipe(preset))
    if fargs:
        base = parse_options(Config, fargs, prog, default=base, where=f"in {config_file}", config_keys=True)
    cfg = check_config(parse_options(Config, argv, prog, default=base, config_keys=True))
    cfg.explicit = explicit_keys(fargs) | explicit_keys(argv)
    return cfg


# flags that are short aliases of a config key (schema.py's _alias)
_ALIASES = {"out": "train.out_dir", "resume": "train.resume", "compile": "train.compile",
            "init_from": "train.init_from", "auto": "train.auto", "teacher": "distill.teacher"}


def explicit_keys(args: list[str]) -> set[str]:
    """The config keys a command line (or a config file's arguments) sets explicitly: "section.key"."""
    keys = set()
    for a in args:
        if a == "--":
            break
        if a.startswith("--"):
            name = a[2:].split("=", 1)[0].replace("-", "_")
            keys.add(_ALIASES.get(name, name))
    return keys


def _legacy_default(f: dataclasses.Field):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _same_kind(value, default) -> bool:
    if value is None or default is None:
        return True  # Optional keys; the range checks below catch the rest
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    return type(value) is type(default)


def restore_recipe(cfg: Config, saved: dict, where: str) -> list[str]:
    """A resume trains on with the settings the run was started with: every model key and every recipe key of
    the train section (schema.RECIPE_KEYS) takes its value from the checkpoint's config.json, unless this command
    line or config file sets it (cfg.explicit). A key the saved config lacks (a checkpoint written before the key
    existed) takes the key's dataclass default, which is always the behaviour from before the key. So a preset's
    new defaults never change a run already under way. A saved config without a train section (written by no
    gptforge version) leaves the train keys alone. -> the keys changed, as "key=value"."""
    if not isinstance(saved, dict):
        raise UserError(f"{where} is not a table of config sections; resume from another checkpoint")
    explicit = getattr(cfg, "explicit", set())
    changed = []
    for section, keys in (("model", None), ("train", RECIPE_KEYS)):
        if section not in saved:
            continue
        obj, values = getattr(cfg, section), saved[section]
        if not isinstance(values, dict):
            raise UserError(f"{where}: section '{section}' is not a table; resume from another checkpoint")
        for f in dataclasses.fields(obj):
            key = f"{section}.{f.name}"
            if (keys is not None and f.name not in keys) or key in explicit:
                continue
            default = _legacy_default(f)
            value = values.get(f.name, default)
            if not _same_kind(value, default):
                raise UserError(f"{where}: {key}={_short(value)} is not a {type(default).__name__}; "
                                "resume from another checkpoint")
            if getattr(obj, f.name) != value:
                setattr(obj, f.name, value)
                changed.append(f"{key}={_short(value)}")
    check_config(cfg)
    return changed


def resolve_model(model: GPTConfig, tokenizer_vocab: int | None = None, multiple: int = VOCAB_MULTIPLE) -> GPTConfig:
    """The config's model section (+ the tokenizer's vocab, rounded up to `multiple`) -> a complete GPTConfig,
    or one-line UserError."""
    if tokenizer_vocab is not None:
        if model.vocab_size is None:
            model = dataclasses.replace(model, vocab_size=round_vocab(tokenizer_vocab, multiple))
        elif model.vocab_size < tokenizer_vocab:
            raise UserError(f"the tokenizer has {tokenizer_vocab} tokens but model.vocab_size is "
                            f"{model.vocab_size}; raise model.vocab_size or leave it unset")
    try:
        return model.complete()
    except ValueError as e:
        raise UserError(str(e)) from None


def config_json(cfg: Config) -> str:
    """The resolved config as saved beside the run and every checkpoint (loadable with --config)."""
    return json.dumps(cfg.to_dict(), indent=2) + "\n"


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(config_json(cfg))
