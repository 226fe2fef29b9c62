"""What `gptforge launch`, `gptforge slurm` and `gptforge k8s` share: the training command after ``--``
(its grace period, resume=auto), ``--env NAME=VALUE`` and writing the generated file."""

from __future__ import annotations

import difflib
import math
import os
import re
import shlex
import sys

from gptforge.errors import UserError

# gptforge commands that make sense under torchrun on every node (eval: data-parallel over examples).
TRAIN_COMMANDS = ("pretrain", "sft", "dpo", "distill", "grpo", "bench", "eval")

# stages that save checkpoints: they stop on SIGTERM/SIGINT/SIGUSR1 with one (gptforge.train.preempt)
CHECKPOINTING = ("pretrain", "sft", "dpo", "distill", "grpo")
SHUTDOWN_MARGIN = 10  # seconds torchrun waits, beyond the workers' train.grace_s, before it kills them
# torchrun (--signals-to-handle, read from PET_SIGNALS_TO_HANDLE) passes these on to its workers; by default
# it does not handle SIGUSR1 (Slurm's --signal),
# which would end it at once
ELASTIC_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"

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


def train_grace_s(command: list[str]) -> float:
    """The training command's train.grace_s (its flags and --config file), else the default (30 s)."""
    from gptforge.config.loader import parse_config
    from gptforge.config.schema import TrainSection

    if not command or command[0] not in CHECKPOINTING:
        return TrainSection.grace_s
    try:
        return float(parse_config(command[1:]).train.grace_s)
    except (UserError, SystemExit, ValueError, TypeError):
        return TrainSection.grace_s  # the workers report what is wrong with the command


def shutdown_timeout(grace_s: float) -> int:
    """torchrun's TORCH_ELASTIC_SHUTDOWN_TIMEOUT for workers that have ``grace_s`` to save and exit."""
    return math.ceil(grace_s) + SHUTDOWN_MARGIN


def with_resume(command: list[str]) -> list[str]:
    """Append --train.resume=auto to a checkpointing stage that does not choose its resume: a requeued or
    rescheduled job continues from its newest checkpoint (a first start finds none and starts at step 0)."""
    if not command or command[0] not in CHECKPOINTING:
        return list(command)
    if any(a.split("=")[0] in ("--train.resume", "--resume", "--train-resume") for a in command):
        return list(command)
    return [*command, "--train.resume=auto"]
