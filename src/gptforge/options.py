"""Command-line options: every command's options are one dataclass, parsed by tyro with the same rules.

Fields are the flags (``--master-port`` or ``--master_port``), their docstrings the help. Values: ``true``
/``false``/``yes``/``no``/``1``/``0`` for bools, ``2e6`` and ``1_000`` for ints. A field annotated
``Passthrough`` receives whatever follows ``--`` (the training command of ``launch``, ``slurm``, ``k8s``,
``bench``). Mistakes are one line (``UserError``): an unknown flag names the nearest valid one, a bad value
names the flag and what it expects.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import io
import re
import sys
import typing
from typing import Annotated, Any

import tyro
from tyro import constructors

from gptforge.errors import UserError

# A field of this type receives the arguments after `--` (never a flag of its own).
Passthrough = Annotated[list[str], tyro.conf.Suppress]

# ---- value rules shared by every command: true/false/yes/no/1/0 for bools, 2e6 and 1_000 for ints --
REGISTRY = constructors.ConstructorRegistry()
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def _bool_from(args: list[str]) -> bool:
    if not args:  # a bare switch: --dry-run
        return True
    if len(args) > 1:
        raise ValueError(f"takes one value (true or false), got {' '.join(args)!r}")
    v = args[0].lower()
    if v in _TRUE or v in _FALSE:
        return v in _TRUE
    raise ValueError(f"expects true or false, got {args[0]!r}")


def _int_from(args: list[str]) -> int:
    s = args[0]
    try:
        return int(s)
    except ValueError:
        try:
            f = float(s)
        except ValueError:
            raise ValueError(f"expects an integer, got {s!r}") from None
        if not f.is_integer():
            raise ValueError(f"expects an integer, got {s!r}") from None
        return int(f)


@REGISTRY.primitive_rule
def _bool_rule(info):
    if info.type is not bool:
        return None
    return constructors.PrimitiveConstructorSpec(
        nargs="*", metavar="[{true,false}]", instance_from_str=_bool_from, is_instance=lambda x: isinstance(x, bool),
        str_from_instance=lambda x: ["true" if x else "false"])


@REGISTRY.primitive_rule
def _int_rule(info):
    if info.type is not int:
        return None
    return constructors.PrimitiveConstructorSpec(
        nargs=1, metavar="INT", instance_from_str=_int_from,
        is_instance=lambda x: isinstance(x, int) and not isinstance(x, bool), str_from_instance=lambda x: [str(x)])


# ---- parsing ------------------------------------------------------------------------------------------
def _flags(cls: type, prefix: str = "") -> dict[str, Any]:
    """'--section.key' / '--key' -> field type, for every field tyro exposes (dashes and underscores)."""
    out: dict[str, Any] = {}
    hints = typing.get_type_hints(cls, include_extras=True)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if tp == Passthrough:
            continue
        name = prefix + f.name
        if dataclasses.is_dataclass(tp):
            out |= _flags(tp, name + ".")
        else:
            out["--" + name.replace("_", "-")] = tp
    return out


def _aliases(cls: type) -> dict[str, str]:
    """Alias flags declared with tyro.conf.arg(aliases=...) -> the flag they stand for."""
    out: dict[str, str] = {}
    hints = typing.get_type_hints(cls, include_extras=True)
    for f in dataclasses.fields(cls):
        for meta in getattr(hints[f.name], "__metadata__", ()):
            for a in getattr(meta, "aliases", None) or ():
                out[a] = "--" + f.name.replace("_", "-")
    return out


def _norm_flag(flag: str) -> str:
    return flag if flag.startswith("--") is False else "--" + flag[2:].replace("_", "-")


def check_flags(cls: type, argv: list[str], where: str = "on the command line") -> None:
    """Unknown flags get one line naming the nearest valid one (before tyro sees them)."""
    valid = _flags(cls)
    known = set(valid) | set(_aliases(cls)) | {"-h", "--help"}
    for a in argv:
        if not a.startswith("-") or _is_number(a):
            continue
        flag = _norm_flag(a.split("=", 1)[0])
        if flag in known:
            continue
        near = difflib.get_close_matches(flag, list(valid), n=1, cutoff=0.5)
        hint = f"; did you mean '{near[0]}'?" if near else "; see --help for the options"
        raise UserError(f"unknown option '{a.split('=', 1)[0]}' {where}{hint}")


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _one_line(text: str) -> str:
    """tyro's boxed error -> its first message line."""
    flat = " ".join(re.sub(r"[│╭╮╰╯─]+", " ", text).split())
    for pat in (r"Error parsing (--\S+?):? (.*?)(?: Argument helptext:| For full helptext|$)",
                r"(invalid choice .*?)(?: Argument helptext:| For full helptext|$)",
                r"(Required options? .*?|Missing required .*?)(?: Argument helptext:| For full helptext|$)",
                r"(Unrecognized options?: .*?)(?: Perhaps| For full helptext|$)"):
        m = re.search(pat, flat)
        if m:
            return ": ".join(g.strip() for g in m.groups() if g).rstrip(". ")
    return flat[:300] or "invalid arguments"


def _description(cls: type) -> str | None:
    doc = (cls.__doc__ or "").strip()
    return None if not doc or doc.startswith(cls.__name__ + "(") else doc


def parse_options(cls: type, argv: list[str], prog: str, default: Any = None) -> Any:
    """argv -> an instance of the dataclass `cls` (tyro), or UserError with one line; --help prints and exits."""
    argv = list(argv)
    rest: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, rest = argv[:i], argv[i + 1:]
    pass_field = next((f.name for f in dataclasses.fields(cls)
                       if typing.get_type_hints(cls, include_extras=True)[f.name] == Passthrough), None)
    if rest and pass_field is None:
        raise UserError(f"{prog} takes no arguments after '--'")
    help_ = any(a in ("-h", "--help") for a in argv)
    if not help_:
        check_flags(cls, argv)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            opts = tyro.cli(cls, args=["--help"] if help_ else argv, prog=prog, default=default, registry=REGISTRY,
                            description=_description(cls),
                            config=(tyro.conf.FlagConversionOff, tyro.conf.AvoidSubcommands))
    except SystemExit as e:
        if help_ or e.code in (0, None):
            sys.stderr.write(err.getvalue())
            raise
        raise UserError(_one_line(err.getvalue())) from None
    if pass_field is not None:
        setattr(opts, pass_field, rest)
    return opts


