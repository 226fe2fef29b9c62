"""What `gptforge slurm` and `gptforge k8s` share: the training command after ``--``, ``--env NAME=VALUE``
and writing the generated file."""

from __future__ import annotations

import difflib
import os
import re
import shlex
import sys

from gptforge.errors import UserError

# gptforge commands that make sense under torchrun on every node.
TRAIN_COMMANDS = ("pretrain", "sft", "dpo", "bench")

_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def check_train_command(train: list[str], prog: str, example: str) -> None:
    if not train:
        raise UserError(f"{prog}: nothing to run; put the training command after '--', e.g. "
                        f"gptforge {prog} {example} -- pretrain --model.preset=tiny")
    if train[0] not in TRAIN_COMMANDS:
        near = difflib.get_close_matches(train[0], TRAIN_COMMANDS, n=1)
        hint = f"; did you mean '{near[0]}'?" if near else f"; use one of: {', '.join(TRAIN_COMMANDS)}"
        raise UserError(f"{prog}: '{train[0]}' is not a training command{hint}")


def parse_env(items: list[str], prog: str) -> list[tuple[str, str]]:
    out = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not _ENV_KEY.match(key):
            raise UserError(f"{prog}: --env '{item}' must look like NAME=value")
        out.append((key, value))
    return out


def write_output(text: str, out: str | None, executable: bool = False, submit_hint: str = "") -> None:
    if out is None or out == "-":
        sys.stdout.write(text)
        return
    try:
        with open(out, "w") as f:
            f.write(text)
        if executable:
            os.chmod(out, 0o755)
    except OSError as e:
        raise UserError(f"cannot write {out}: {e.strerror}; pick a writable path with --out") from e
    print(f"wrote {out}" + (f"; {submit_hint} {shlex.quote(out)}" if submit_hint else ""), file=sys.stderr)
