"""`gptforge slurm`: write an sbatch script that runs one torchrun per node through `srun`.

    gptforge slurm --nodes 2 --gpus-per-node 8 --time 02:00:00 --out train.sbatch -- pretrain --model.preset=small
    sbatch train.sbatch

The script takes the master (rendezvous host) from the job's node list, so it runs unchanged on any
allocation: `srun` starts one `torchrun` per node and the c10d rendezvous (keyed by the job id) gives
each node its rank.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys

from gptforge.errors import UserError

# gptforge commands that make sense under torchrun on every node.
TRAIN_COMMANDS = ("pretrain", "sft", "dpo", "bench")

_IFACE = re.compile(r"^[A-Za-z0-9_.:@-]{1,15}$")
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SLURM_TIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$|^\d+-\d+$")
_JOB_NAME = re.compile(r"^[A-Za-z0-9_.+-]{1,128}$")


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one-line UserErrors (the CLI prints them without a traceback)."""

    def error(self, message: str):  # type: ignore[override]
        raise UserError(f"{self.prog.removeprefix('gptforge ')}: {message} (see '{self.prog} --help')")


def split_train_args(argv: list[str], prog: str, example: str = "--nodes 2") -> tuple[list[str], list[str]]:
    """Split `[options] -- <gptforge command and its args>` and check the command."""
    if "--" in argv:
        i = argv.index("--")
        own, train = argv[:i], argv[i + 1 :]
    else:
        own, train = argv, []
    if not train:
        raise UserError(
            f"{prog}: nothing to run; put the training command after '--', e.g. "
            f"gptforge {prog} {example} -- pretrain --model.preset=tiny"
        )
    if train[0] not in TRAIN_COMMANDS:
        import difflib

        near = difflib.get_close_matches(train[0], TRAIN_COMMANDS, n=1)
        hint = f"; did you mean '{near[0]}'?" if near else f"; use one of: {', '.join(TRAIN_COMMANDS)}"
        raise UserError(f"{prog}: '{train[0]}' is not a training command{hint}")
    return own, train


def parse_env(items: list[str], prog: str) -> list[tuple[str, str]]:
    out = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not _ENV_KEY.match(key):
            raise UserError(f"{prog}: --env '{item}' must look like NAME=value")
        out.append((key, value))
    return out


def check_iface(iface: str | None, prog: str) -> None:
    if iface is not None and not _IFACE.match(iface):
        raise UserError(f"{prog}: --iface '{iface}' is not a network interface name (see 'ip -br addr')")


def check_port(port: int, prog: str) -> None:
    if not 1 <= port <= 65535:
        raise UserError(f"{prog}: --port {port} must be in 1..65535")


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


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="gptforge slurm",
        description="Write an sbatch script: one torchrun per node via srun, master from the node list.",
        epilog="Everything after '--' is the gptforge training command, e.g. -- pretrain --model.preset=small",
    )
    p.add_argument("--nodes", type=int, default=2, help="number of nodes (default 2)")
    p.add_argument("--gpus-per-node", type=int, default=1, help="GPUs per node, one worker each; 0 = CPU (default 1)")
    p.add_argument("--nproc-per-node", type=int, default=None, help="workers per node (default: GPUs per node, 1 on CPU)")
    p.add_argument("--cpus-per-task", type=int, default=None, help="CPU cores per node's task")
    p.add_argument("--mem", default=None, help="memory per node, e.g. 200G")
    p.add_argument("--time", default="01:00:00", help="wall-time limit (default 01:00:00)")
    p.add_argument("--job-name", default="gptforge", help="job name (default gptforge)")
    p.add_argument("--output", default="%x-%j.out", help="Slurm log file pattern (default %%x-%%j.out)")
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--chdir", default=None, help="working directory of the job (default: where sbatch runs)")
    p.add_argument("--port", type=int, default=29500, help="rendezvous port on the first node (default 29500)")
    p.add_argument("--join-timeout", type=int, default=900,
                   help="seconds the nodes wait for each other at the rendezvous (default 900)")
    p.add_argument("--iface", default=None, help="network interface for NCCL/Gloo (NCCL_SOCKET_IFNAME, GLOO_SOCKET_IFNAME)")
    p.add_argument("--no-ib", action="store_true", help="no InfiniBand: NCCL_IB_DISABLE=1 (plain Ethernet)")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="export a variable (repeatable)")
    p.add_argument("--container-image", default=None, help="run inside this image with pyxis/enroot (srun --container-image)")
    p.add_argument("--container-mounts", default=None, help="pyxis mounts, e.g. /data:/workspace/data")
    p.add_argument("--container-workdir", default=None, help="working directory inside the container")
    p.add_argument("--out", default=None, help="write the script to FILE (default: stdout)")
    return p


def render(args: argparse.Namespace, train: list[str], argv: list[str]) -> str:
    prog = "slurm"
    for opt in ("output", "partition", "account", "chdir", "mem"):
        value = getattr(args, opt)
        if value is not None and (not value or re.search(r"\s", value)):
            raise UserError(f"{prog}: --{opt} '{value}' must be non-empty and without spaces")
    if args.nodes < 1:
        raise UserError(f"{prog}: --nodes {args.nodes} must be at least 1")
    if args.gpus_per_node < 0:
        raise UserError(f"{prog}: --gpus-per-node {args.gpus_per_node} must be 0 (CPU) or more")
    nproc = args.nproc_per_node if args.nproc_per_node is not None else max(1, args.gpus_per_node)
    if nproc < 1:
        raise UserError(f"{prog}: --nproc-per-node {nproc} must be at least 1")
    if not _SLURM_TIME.match(args.time):
        raise UserError(f"{prog}: --time '{args.time}' is not a Slurm time; use e.g. 01:00:00 or 1-12:00:00")
    if not _JOB_NAME.match(args.job_name):
        raise UserError(f"{prog}: --job-name '{args.job_name}' may only contain letters, digits and _.+-")
    if args.join_timeout < 1:
        raise UserError(f"{prog}: --join-timeout must be a positive number of seconds")
    check_port(args.port, prog)
    check_iface(args.iface, prog)
    env = parse_env(args.env, prog)
    if (args.container_mounts or args.container_workdir) and not args.container_image:
        raise UserError(f"{prog}: --container-mounts/--container-workdir need --container-image")

    q = shlex.quote
    sb = [
        "#!/bin/bash",
        f"#SBATCH --job-name={args.job_name}",
        f"#SBATCH --nodes={args.nodes}",
        "#SBATCH --ntasks-per-node=1",
    ]
    if args.gpus_per_node > 0:
        sb.append(f"#SBATCH --gpus-per-node={args.gpus_per_node}")
    if args.cpus_per_task:
        sb.append(f"#SBATCH --cpus-per-task={args.cpus_per_task}")
    if args.mem:
        sb.append(f"#SBATCH --mem={args.mem}")
    sb += [f"#SBATCH --time={args.time}", f"#SBATCH --output={args.output}"]
    if args.partition:
        sb.append(f"#SBATCH --partition={args.partition}")
    if args.account:
        sb.append(f"#SBATCH --account={args.account}")
    if args.chdir:
        sb.append(f"#SBATCH --chdir={args.chdir}")

    body = [
        "#",
        "# Generated by: gptforge slurm " + shlex.join(argv).replace("\n", "\\n").replace("\r", "\\r"),
        "# Submit with: sbatch THIS_FILE. One torchrun per node (srun), c10d rendezvous on the first node.",
        "set -euo pipefail",
        "",
        "# The first node of the allocation hosts the rendezvous.",
        'MASTER_ADDR=$(set +o pipefail; scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)',
        f"MASTER_PORT={args.port}",
        "export MASTER_ADDR MASTER_PORT",
    ]
    if args.iface:
        body.append(f"export NCCL_SOCKET_IFNAME={q(args.iface)} GLOO_SOCKET_IFNAME={q(args.iface)}")
    if args.no_ib:
        body.append("export NCCL_IB_DISABLE=1")
    for key, value in env:
        body.append(f"export {key}={q(value)}")
    body += [
        'echo "gptforge: job $SLURM_JOB_ID on $SLURM_NNODES nodes ($SLURM_JOB_NODELIST), '
        'rendezvous $MASTER_ADDR:$MASTER_PORT"',
        "",
    ]
    srun = ["srun", "--nodes=$SLURM_NNODES", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    if args.container_image:
        srun.append(f"--container-image={q(args.container_image)}")
        if args.container_mounts:
            srun.append(f"--container-mounts={q(args.container_mounts)}")
        if args.container_workdir:
            srun.append(f"--container-workdir={q(args.container_workdir)}")
    torchrun = [
        "torchrun",
        '--nnodes="$SLURM_NNODES"',
        f"--nproc-per-node={nproc}",
        "--rdzv-backend=c10d",
        '--rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT"',
        '--rdzv-id="$SLURM_JOB_ID"',
        f"--rdzv-conf=join_timeout={args.join_timeout}",
        "--max-restarts=0",
        "-m",
        "gptforge",
    ]
    srun = [s.replace("$SLURM_NNODES", '"$SLURM_NNODES"') for s in srun]
    lines = [" ".join(srun) + " \\", "  " + " ".join(torchrun) + " \\", "  " + shlex.join(train)]
    return "\n".join(sb + body + lines) + "\n"


def parse_cli(argv: list[str], parser, prog: str, **kw):
    """-> (args, training command), or None after printing --help (asked for before the "--")."""
    if any(a in ("-h", "--help") for a in argv[: argv.index("--") if "--" in argv else len(argv)]):
        parser.print_help()
        return None
    own, train = split_train_args(argv, prog, **kw)
    return parser.parse_args(own), train


def main(argv: list[str]) -> int:
    argv = list(argv)
    parsed = parse_cli(argv, build_parser(), "slurm")
    if parsed is None:
        return 0
    args, train = parsed
    text = render(args, train, argv)
    write_output(text, args.out, executable=True, submit_hint="submit with: sbatch")
    return 0
