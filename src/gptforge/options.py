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
            raise ValueError(f"expects int, got {s!r}") from None
        if not f.is_integer():
            raise ValueError(f"expects int, got {s!r}") from None
        return int(f)


def _float_from(args: list[str]) -> float:
    try:
        return float(args[0])
    except ValueError:
        raise ValueError(f"expects float, got {args[0]!r}") from None


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


# type -> (nargs, metavar, from strings, is an instance, to strings); a bool takes 0 or 1 value
_RULES = {
    bool: ("*", "[{true,false}]", _bool_from, lambda x: isinstance(x, bool), lambda x: ["true" if x else "false"]),
    int: (1, "INT", _int_from, lambda x: _is_num(x) and isinstance(x, int), lambda x: [str(x)]),
    float: (1, "FLOAT", _float_from, _is_num, lambda x: [repr(x)]),
}


@REGISTRY.primitive_rule
def _primitive_rule(info):
    if info.type not in _RULES:
        return None
    nargs, metavar, parse, is_instance, to_str = _RULES[info.type]
    return constructors.PrimitiveConstructorSpec(nargs=nargs, metavar=metavar, instance_from_str=parse,
                                                 is_instance=is_instance, str_from_instance=to_str)


# ---- parsing ------------------------------------------------------------------------------------------
def _fields(cls: type, prefix: str = "") -> dict[str, tuple[Any, tuple[str, ...]]]:
    """Every flag tyro exposes: 'section.key' (underscores) -> (type, aliases)."""
    out: dict[str, tuple[Any, tuple[str, ...]]] = {}
    hints = typing.get_type_hints(cls, include_extras=True)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if tp == Passthrough:
            continue
        if dataclasses.is_dataclass(tp):
            out |= _fields(tp, prefix + f.name + ".")
            continue
        aliases = tuple(a for m in getattr(tp, "__metadata__", ()) for a in (getattr(m, "aliases", None) or ()))
        out[prefix + f.name] = (tp, aliases)
    return out


def _key(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


class _Style:
    """How a flag is named in an error: 'option --top-k' or, for the training config, 'config key train.lr'."""

    def __init__(self, config_keys: bool):
        self.config_keys = config_keys

    def name(self, key: str) -> str:
        return f"config key '{key}'" if self.config_keys else f"option '--{key.replace('_', '-')}'"

    def spell(self, key: str) -> str:
        return key if self.config_keys else "--" + key.replace("_", "-")


def _tuple_len(tp) -> int:
    """n for a field of type tuple[str, ...n] (or that | None), -1 for tuple[str, ...] (any number, up to the next
    of the command's own flags), -2 for list[str] (any number, up to the next word starting with '-': prepare
    --input a.txt b.txt, a shell glob; not with tyro.conf.UseAppendAction: one value a flag, repeated), else 0."""
    if tyro.conf.UseAppendAction in getattr(tp, "__metadata__", ()):
        return 0
    for t in (tp, *typing.get_args(tp)):
        if typing.get_origin(t) is tuple:
            return -1 if Ellipsis in typing.get_args(t) else len(typing.get_args(t))
        if typing.get_origin(t) is list:
            return -2
    return 0


def _ends_values(n: int, a: str, fields: dict, aliases: dict) -> bool:
    """Does word `a` end the values of a field of any length (n < 0, see _tuple_len)?"""
    return n < 0 and (_is_flag(a, fields, aliases) or (n == -2 and a.startswith("-")))


def _is_flag(a: str, fields: dict, aliases: dict) -> bool:
    """Is `a` one of the command's own flags (which ends the values of a tuple of any length)?"""
    flag = a.split("=", 1)[0]
    return a.startswith("-") and (flag in ("-h", "--help", "--") or flag in aliases or _key(flag) in fields)


def _protect_tuple_values(cls: type, argv: list[str]) -> list[str]:
    """The parser takes '--x=1' after a flag for another option, but ' --x=1' for a value: the values of a tuple
    field that start with '-' get a leading space (shlex.split and str.split drop it again). A tuple of any
    length takes the values up to the next of the command's own flags."""
    fields, out, n = _fields(cls), [], 0
    aliases = {a: k for k, (_, al) in fields.items() for a in al}
    for a in argv:
        if _ends_values(n, a, fields, aliases):
            n = 0
        if n:
            out.append(" " + a if a.startswith("-") else a)
            n -= 1 if n > 0 else 0
            continue
        out.append(a)
        if a.startswith("--") and "=" not in a:
            n = _tuple_len(fields.get(_key(a), (None,))[0])
    return out


def check_flags(cls: type, argv: list[str], where: str = "on the command line", config_keys: bool = False) -> None:
    """Unknown flags and stray words get one line naming the nearest valid flag (before tyro sees them)."""
    fields = _fields(cls)
    aliases = {a: k for k, (_, al) in fields.items() for a in al}
    style = _Style(config_keys)
    takes_value, verbatim, lists = False, 0, set()
    for a in argv:
        if _ends_values(verbatim, a, fields, aliases):  # the end of a tuple of any length (bench --to-loss), a list
            verbatim = 0
        if verbatim:  # the values of a tuple field (e.g. bench --compare A B) may look like options
            verbatim -= 1 if verbatim > 0 else 0
            continue
        if not a.startswith("-") or _is_number(a):
            if not takes_value:
                near = difflib.get_close_matches(_key(a.split("=", 1)[0]), list(fields), n=1, cutoff=0.5)
                hint = f"; did you mean '--{style.spell(near[0])}=...'?" if near else "; options look like --name=value"
                raise UserError(f"unexpected argument '{a}' {where}{hint}")
            takes_value = False
            continue
        flag = a.split("=", 1)[0]
        if flag in ("-h", "--help") or flag in aliases or _key(flag) in fields:
            tp = fields.get(aliases.get(flag, _key(flag)), (None,))[0]
            takes_value = "=" not in a and getattr(tp, "__origin__", tp) is not bool and flag not in ("-h", "--help")
            verbatim = _tuple_len(tp) if takes_value else 0
            takes_value = takes_value and not verbatim
            if _tuple_len(tp) == -2:  # a second --input would replace the first: say how to give several
                key = aliases.get(flag, _key(flag))
                if key in lists:
                    raise UserError(f"{style.name(key)} is given twice {where}; give all its values after one "
                                    f"{style.spell(key)}: {style.spell(key)} A B (or a comma list A,B)")
                lists.add(key)
            continue
        near = difflib.get_close_matches(_key(flag), list(fields), n=1, cutoff=0.5)
        hint = f"; did you mean '{style.spell(near[0])}'?" if near else "; see --help for the options"
        what = f"config key '{_key(flag)}'" if config_keys else f"option '{flag}'"
        raise UserError(f"unknown {what} {where}{hint}")


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _one_line(text: str, style: _Style, where: str) -> str:
    """tyro's boxed error -> one line naming the flag and what it expects."""
    flat = " ".join(re.sub(r"[│╭╮╰╯─]+|-{3,}", " ", text).split())  # box drawing and ---- rules
    m = re.search(r"Error parsing (--\S+?):? (?:no type matching (.*?) could be instantiated from \['(.*?)'\])?(.*?)"
                  r"(?: Argument helptext:| Got errors:| For full helptext|$)", flat)
    if m:
        wanted = (m.group(2) or "").replace("{None}|", "").replace("|{None}", "").lower()
        msg = m.group(4).strip().rstrip(".") or f"expects {wanted or 'another value'}, got {m.group(3)!r}"
        return f"{style.name(_key(m.group(1).split('/')[-1]))} {msg} {where}"
    m = re.search(r"invalid choice '(.*?)' for argument '(--\S+?)'\. Expected one of \((.*?)\)", flat)
    if m:
        return f"{style.name(_key(m.group(2).split('/')[-1]))} must be one of {m.group(3)}, got '{m.group(1)}' {where}"
    m = re.search(r"(Required options?|Missing required|Missing value for argument) ?(.*?)(?: Argument helptext:| "
                  r"For full helptext|$)", flat)
    if m:
        return f"{m.group(1)} {m.group(2)}".strip().rstrip(".") + f" {where}"
    return (flat[:300] or "invalid arguments") + f" {where}"


def _description(cls: type) -> str | None:
    doc = (cls.__doc__ or "").strip()
    return None if not doc or doc.startswith(cls.__name__ + "(") else doc


def _passthrough_field(cls: type) -> str | None:
    hints = typing.get_type_hints(cls, include_extras=True)
    return next((f.name for f in dataclasses.fields(cls) if hints[f.name] == Passthrough), None)


def parse_options(cls: type, argv: list[str], prog: str, default: Any = None, where: str = "on the command line",
                  config_keys: bool = False) -> Any:
    """argv -> an instance of the dataclass `cls` (tyro), or UserError with one line; --help prints and exits.
    `default`: an instance whose values are the defaults; `config_keys`: name flags as 'config key a.b'."""
    argv = list(argv)
    rest: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, rest = argv[:i], argv[i + 1:]
    pass_field = _passthrough_field(cls)
    if rest and pass_field is None:
        raise UserError(f"{prog} takes no arguments after '--'")
    help_ = any(a in ("-h", "--help") for a in argv)
    if not help_:
        check_flags(cls, argv, where, config_keys)
        aliases = {a: k for k, (_, al) in _fields(cls).items() for a in al}
        argv = ["--" + aliases[a.split("=", 1)[0]] + a[len(a.split("=", 1)[0]):] if a.split("=", 1)[0] in aliases
                else a for a in argv]
        argv = _protect_tuple_values(cls, argv)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            opts = tyro.cli(cls, args=["--help"] if help_ else argv, prog=prog, default=default, registry=REGISTRY,
                            description=_description(cls), use_underscores=config_keys,
                            config=(tyro.conf.FlagConversionOff, tyro.conf.AvoidSubcommands))
    except SystemExit as e:
        if help_ or e.code in (0, None):
            sys.stderr.write(err.getvalue())
            raise
        raise UserError(_one_line(err.getvalue(), _Style(config_keys), where)) from None
    if pass_field is not None:
        setattr(opts, pass_field, rest)
    return opts
