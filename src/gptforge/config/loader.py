"""Config = dataclass defaults <- config file (TOML/YAML/JSON) <- --section.key=value overrides.

tyro does the command-line parsing (and --help); before it, every key and value is checked here so a
mistake gets one line naming the key, the nearest valid key, or the expected type."""

from __future__ import annotations

import dataclasses
import difflib
import json
import sys
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from gptforge.config.presets import MODEL_PRESETS
from gptforge.config.schema import Config
from gptforge.errors import UserError

# flag aliases: issue-style spellings that map to a config key
ALIASES = {"--init-from": "--train.init_from", "--resume": "--train.resume", "--out": "--train.out_dir"}
SWITCHES = {"--auto": "--train.auto=true", "--compile": "--train.compile=true"}  # flags without a value


def _sections(cfg: Config) -> dict[str, Any]:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def _valid_keys() -> list[str]:
    cfg = Config()
    return [f"{s}.{f.name}" for s, sec in _sections(cfg).items() for f in dataclasses.fields(sec)]


def _unknown(key: str, where: str) -> UserError:
    near = difflib.get_close_matches(key, _valid_keys(), n=1, cutoff=0.5)
    hint = f"; did you mean '{near[0]}'?" if near else "; see 'gptforge pretrain --help' for the keys"
    return UserError(f"unknown config key '{key}' {where}{hint}")


def _type_name(tp) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp, key: str) -> Any:
    """Convert `value` (from a file or a command-line string) to the field type `tp` or raise UserError."""
    origin, args = get_origin(tp), get_args(tp)
    if origin is typing.Union:  # Optional[X]
        inner = [a for a in args if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return coerce(value, inner[0], key)
    if origin is Literal:
        if value in args:
            return value
        raise UserError(f"config key '{key}' must be {_type_name(tp)}, got {value!r}")
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
                return value.lower() in ("true", "1", "yes", "on")
            raise ValueError
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            if isinstance(value, str):  # accepts 200, 1_000, 2e6
                try:
                    return int(value)
                except ValueError:
                    f = float(value)
                    if not f.is_integer():
                        raise
                    return int(f)
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if tp is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        raise UserError(f"config key '{key}' expects {_type_name(tp)}, got {value!r}") from None
    return value


def _set(cfg: Config, key: str, value: Any, where: str) -> None:
    section, _, name = key.partition(".")
    sections = _sections(cfg)
    if section not in sections or not name:
        raise _unknown(key, where)
    sec = sections[section]
    hints = typing.get_type_hints(type(sec))
    if name not in hints:
        raise _unknown(key, where)
    setattr(sec, name, coerce(value, hints[name], key))


def load_file(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file '{p}' not found; check the path given to --config")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix == ".toml":
            import tomllib

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


def apply_dict(cfg: Config, data: dict, where: str = "") -> Config:
    for section, values in data.items():
        if not isinstance(values, dict):
            raise _unknown(str(section), where)
        for name, value in values.items():
            _set(cfg, f"{section}.{name}", value, where)
    return cfg


def _split_overrides(argv: list[str]) -> tuple[str | None, list[tuple[str, str]], list[str]]:
    """-> (config file, [(key, value)], other args)."""
    config_file, pairs, other = None, [], []
    i = 0
    while i < len(argv):
        a = SWITCHES.get(argv[i], argv[i])
        flag, eq, val = a.partition("=")
        flag = ALIASES.get(flag, flag)
        if flag == "--config":
            if not eq:
                i += 1
                if i >= len(argv):
                    raise UserError("--config needs a file path")
                val = argv[i]
            config_file = val
        elif flag.startswith("--") and "." in flag:
            if not eq:
                if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                    raise UserError(f"option '{flag}' needs a value: {flag}=VALUE")
                i += 1
                val = argv[i]
            pairs.append((flag[2:].replace("-", "_"), val))
        else:
            other.append(a)
        i += 1
    return config_file, pairs, other


def parse_config(argv: list[str], base: Config | None = None, prog: str = "gptforge pretrain") -> Config:
    """Parse a command line into a Config; all user mistakes raise UserError (one line)."""
    cfg = base if base is not None else Config()
    if any(a in ("-h", "--help") for a in argv):
        import tyro

        tyro.cli(Config, default=cfg, args=["--help"], prog=prog, use_underscores=True,
                 config=(tyro.conf.FlagConversionOff,))
    config_file, pairs, other = _split_overrides(argv)
    if other:
        near = difflib.get_close_matches(other[0].lstrip("-"), _valid_keys(), n=1, cutoff=0.5)
        hint = f"; did you mean '--{near[0]}=...'?" if near else "; options look like --section.key=value"
        raise UserError(f"unexpected argument '{other[0]}'{hint}")
    if config_file:
        apply_dict(cfg, load_file(config_file), f"in {config_file}")
    for key, val in pairs:
        _set(cfg, key, val, "on the command line")
    if cfg.model.preset not in MODEL_PRESETS:
        near = difflib.get_close_matches(cfg.model.preset, MODEL_PRESETS, n=1)
        hint = f"did you mean '{near[0]}'? " if near else ""
        raise UserError(f"unknown model.preset '{cfg.model.preset}'; {hint}choose one of {', '.join(MODEL_PRESETS)}")
    return cfg


def resolve_model(section, tokenizer_vocab: int | None = None):
    """ModelSection (+ the tokenizer's vocab) -> concrete GPTConfig."""
    from gptforge.model.gpt import GPTConfig

    d = dict(MODEL_PRESETS[section.preset])
    for f in dataclasses.fields(section):
        v = getattr(section, f.name)
        if f.name != "preset" and v is not None:
            d[f.name] = v
    if tokenizer_vocab is not None:
        if section.vocab_size is None:
            d["vocab_size"] = (tokenizer_vocab + 63) // 64 * 64
        elif section.vocab_size < tokenizer_vocab:
            raise UserError(f"the tokenizer has {tokenizer_vocab} tokens but model.vocab_size is "
                            f"{section.vocab_size}; raise model.vocab_size or leave it unset")
    if "n_head" in d and section.n_kv_head is None and d.get("arch") == "gpt2":
        d["n_kv_head"] = d["n_head"]
    try:
        return GPTConfig(**d)
    except ValueError as e:
        raise UserError(str(e)) from None


def config_json(cfg: Config) -> str:
    """The resolved config as saved beside the run and every checkpoint (loadable with --config)."""
    return json.dumps(cfg.to_dict(), indent=2) + "\n"


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(config_json(cfg))


def config_from_dict(data: dict) -> Config:
    return apply_dict(Config(), data, "in a saved config")


if __name__ == "__main__":  # pragma: no cover
    print(parse_config(sys.argv[1:]))
