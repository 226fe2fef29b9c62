"""`gptforge slurm`: write an sbatch script that runs one torchrun per node through `srun`.

    gptforge slurm --nnodes 2 --gpus-per-node 8 --time 02:00:00 --out train.sbatch -- pretrain --model.preset=small
    sbatch train.sbatch

The script takes the master (rendezvous host) from the job's node list, so it runs unchanged on any
allocation: `srun` starts one `torchrun` per node and the c10d rendezvous (keyed by the job id) gives
each node its rank. The torchrun command and the network variables come from gptforge.launch.node.

Preemption and time limits (unless ``--no-requeue``): ``#SBATCH --signal=B:USR1@T`` makes Slurm send
SIGUSR1 to the batch script T = train.grace_s + SIGNAL_MARGIN seconds before the time limit (so does
``scancel --signal=USR1 --batch JOB``). The script's trap passes it to srun -> torchrun -> every worker:
they finish the step, save a checkpoint and exit (gptforge.train.preempt); then the script runs
``scontrol requeue`` and the job starts again, continuing from the checkpoint (the training command gets
``--train.resume=auto`` unless it sets a resume). A SIGTERM (scancel, or preemption with
PreemptMode=REQUEUE, which requeues by itself: give it GraceTime >= train.grace_s) is passed on the same
way, without a requeue.
"""

from __future__ import annotations

import dataclasses
import math
import re
import shlex
from typing import Annotated, ClassVar

import tyro

from gptforge.errors import UserError
from gptforge.launch.jobfile import ELASTIC_SIGNALS, check_train_command, parse_env, shutdown_timeout, \
    train_grace_s, with_resume, write_output
from gptforge.launch.node import DEFAULT_PORT, MasterPort, NodeSpec, check_iface_name, check_port, gptforge_target, \
    shell_word
from gptforge.options import Passthrough

_SLURM_TIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$|^\d+-\d+$")
_JOB_NAME = re.compile(r"^[A-Za-z0-9_.+-]{1,128}$")
PROG = "slurm"
SIGNAL_MARGIN = 60  # seconds beyond train.grace_s: torchrun and srun end, the requeue, a slow first step


@dataclasses.dataclass
class SlurmOptions:
    """Write an sbatch script: one torchrun per node via srun, master from the node list. Everything after
    '--' is the gptforge training command, e.g. -- pretrain --model.preset=small"""

    error_prefix: ClassVar[str] = "slurm: "

    nnodes: Annotated[int, tyro.conf.arg(aliases=["--nodes"])] = 2
    """number of nodes (alias --nodes)"""
    gpus_per_node: int = 1
    """GPUs per node, one worker each; 0 = CPU"""
    nproc_per_node: int | None = None
    """workers per node (default: GPUs per node, 1 on CPU)"""
    cpus_per_task: int | None = None
    """CPU cores per node's task"""
    mem: str | None = None
    """memory per node, e.g. 200G"""
    time: str = "01:00:00"
    """wall-time limit"""
    job_name: str = "gptforge"
    """job name"""
    output: str = "%x-%j.out"
    """Slurm log file pattern"""
    partition: str | None = None
    account: str | None = None
    chdir: str | None = None
    """working directory of the job (default: where sbatch runs)"""
    master_port: MasterPort = DEFAULT_PORT
    """rendezvous port on the first node (alias --port)"""
    rdzv_timeout: Annotated[int, tyro.conf.arg(aliases=["--join-timeout"])] = 900
    """seconds the nodes wait for each other at the rendezvous (alias --join-timeout)"""
    iface: str | None = None
    """network interface for NCCL/Gloo (NCCL_SOCKET_IFNAME, GLOO_SOCKET_IFNAME)"""
    no_ib: bool = False
    """no InfiniBand: NCCL_IB_DISABLE=1 (plain Ethernet)"""
    env: Annotated[list[str], tyro.conf.UseAppendAction] = dataclasses.field(default_factory=list)
    """export a variable NAME=VALUE (repeatable)"""
    container_image: str | None = None
    """run inside this image with pyxis/enroot (srun --container-image)"""
    container_mounts: str | None = None
    """pyxis mounts, e.g. /data:/workspace/data"""
    container_workdir: str | None = None
    """working directory inside the container"""
    no_requeue: bool = False
    """do not requeue: before the time limit (or on SIGUSR1) save a checkpoint and end (default: save, requeue
    the job, resume from the checkpoint)"""
    out: str | None = None
    """write the script to FILE (default: stdout)"""
    command: Passthrough = dataclasses.field(default_factory=list)


def _check(opts: SlurmOptions) -> int:
    """Validate; returns the workers per node."""
    p = f"{PROG}: "
    check_train_command(opts.command, PROG, "--nnodes 2")
    for opt in ("output", "partition", "account", "chdir", "mem"):
        value = getattr(opts, opt)
        if value is not None and (not value or re.search(r"\s", value)):
            raise UserError(f"{p}--{opt} '{value}' must be non-empty and without spaces")
    if opts.nnodes < 1:
        raise UserError(f"{p}--nnodes {opts.nnodes} must be at least 1")
    if opts.gpus_per_node < 0:
        raise UserError(f"{p}--gpus-per-node {opts.gpus_per_node} must be 0 (CPU) or more")
    nproc = opts.nproc_per_node if opts.nproc_per_node is not None else max(1, opts.gpus_per_node)
    if nproc < 1:
        raise UserError(f"{p}--nproc-per-node {nproc} must be at least 1")
    if not _SLURM_TIME.match(opts.time):
        raise UserError(f"{p}--time '{opts.time}' is not a Slurm time; use e.g. 01:00:00 or 1-12:00:00")
    if not _JOB_NAME.match(opts.job_name):
        raise UserError(f"{p}--job-name '{opts.job_name}' may only contain letters, digits and _.+-")
    if opts.rdzv_timeout < 1:
        raise UserError(f"{p}--rdzv-timeout must be a positive number of seconds")
    check_port(opts.master_port, p)
    check_iface_name(opts.iface, p)
    if (opts.container_mounts or opts.container_workdir) and not opts.container_image:
        raise UserError(f"{p}--container-mounts/--container-workdir need --container-image")
    return nproc


def as_argv(opts) -> list[str]:
    """The options that differ from the defaults, as flags (for the 'Generated by' line)."""
    out: list[str] = []
    for f in dataclasses.fields(opts):
        value = getattr(opts, f.name)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if f.name == "command" or value == default:
            continue
        flag = "--" + f.name.replace("_", "-")
        for v in value if isinstance(value, list) else [value]:
            out += [flag] if v is True else [f"{flag}={str(v).lower() if isinstance(v, bool) else v}"]
    return [*out, "--", *opts.command]


def render(opts: SlurmOptions) -> str:
    """The sbatch script: #SBATCH header, the environment, the signal traps, then srun + torchrun."""
    nproc = _check(opts)
    grace = train_grace_s(opts.command)
    warn = math.ceil(grace) + SIGNAL_MARGIN
    lines = _header(opts, warn) + _environment(opts, grace) + _traps(grace, warn) + _launch(opts, nproc)
    return "\n".join(lines) + "\n"


def _header(opts: SlurmOptions, warn: int) -> list[str]:
    sb = ["#!/bin/bash", f"#SBATCH --job-name={opts.job_name}", f"#SBATCH --nodes={opts.nnodes}",
          "#SBATCH --ntasks-per-node=1"]
    if opts.gpus_per_node > 0:
        sb.append(f"#SBATCH --gpus-per-node={opts.gpus_per_node}")
    if opts.cpus_per_task:
        sb.append(f"#SBATCH --cpus-per-task={opts.cpus_per_task}")
    if opts.mem:
        sb.append(f"#SBATCH --mem={opts.mem}")
    sb += [f"#SBATCH --time={opts.time}", f"#SBATCH --output={opts.output}"]
    sb += [f"#SBATCH --signal=B:USR1@{warn}", "#SBATCH --open-mode=append"]  # a requeued run appends its log
    if not opts.no_requeue:
        sb.append("#SBATCH --requeue")
    for key in ("partition", "account", "chdir"):
        if getattr(opts, key):
            sb.append(f"#SBATCH --{key}={getattr(opts, key)}")
    return sb


def _spec(opts: SlurmOptions, nproc: int) -> NodeSpec:
    # the rendezvous orders the nodes (node_rank None); the first node of the allocation hosts it
    return NodeSpec(nnodes="$SLURM_NNODES", node_rank=None, nproc_per_node=nproc, master_addr="$MASTER_ADDR",
                    master_port="$MASTER_PORT", iface=opts.iface, no_ib=opts.no_ib, rdzv_id="$SLURM_JOB_ID",
                    rdzv_timeout=opts.rdzv_timeout)


def _environment(opts: SlurmOptions, grace: float) -> list[str]:
    """The rendezvous address and every exported variable (network, signal handling, --env)."""
    env = parse_env(opts.env, PROG)
    spec = _spec(opts, 1)
    body = [
        "#",
        "# Generated by: gptforge slurm " + shlex.join(as_argv(opts)).replace("\n", "\\n").replace("\r", "\\r"),
        "# Submit with: sbatch THIS_FILE. One torchrun per node (srun), c10d rendezvous on the first node.",
        "set -euo pipefail",
        "",
        "# The first node of the allocation hosts the rendezvous.",
        'MASTER_ADDR=$(set +o pipefail; scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)',
        f"MASTER_PORT={opts.master_port}",
        "export MASTER_ADDR MASTER_PORT",
    ]
    stop_env = {"PET_SIGNALS_TO_HANDLE": ELASTIC_SIGNALS,
                "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(shutdown_timeout(grace))}
    body += [f"export {k}={shlex.quote(v)}" for k, v in [*spec.network_env().items(), *stop_env.items(), *env]]
    return body + ['echo "gptforge: job $SLURM_JOB_ID on $SLURM_NNODES nodes ($SLURM_JOB_NODELIST), '
                   'rendezvous $MASTER_ADDR:$MASTER_PORT"', ""]


def _traps(grace: float, warn: int) -> list[str]:
    """SIGUSR1 / SIGTERM are passed on to the workers (through srun), and remembered for the requeue."""
    return [
        f"# SIGUSR1 arrives {warn} s before the time limit (--signal; or scancel --signal=USR1 --batch $SLURM_JOB_ID),",
        "# SIGTERM on scancel or preemption: srun passes it to torchrun, torchrun to every worker; they finish the",
        f"# step, save a checkpoint and exit within train.grace_s={grace:g} s; USR1 then requeues the job.",
        'STOP_SIGNAL=""',
        "# shellcheck disable=SC2329  # stop() is called by the traps",
        'stop() { [ -n "$STOP_SIGNAL" ] || STOP_SIGNAL=$1; echo "gptforge: got SIG$1, passing it to the workers"; '
        'kill -s "$1" "${SRUN_PID:-}" 2>/dev/null || true; }',
        "trap 'stop USR1' USR1",
        "trap 'stop TERM' TERM",
        "",
    ]


def _launch(opts: SlurmOptions, nproc: int) -> list[str]:
    """srun + torchrun + the training command in the background, waited for; requeued after SIGUSR1."""
    srun = ["srun", '--nodes="$SLURM_NNODES"', "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    for key in ("container_image", "container_mounts", "container_workdir"):
        if getattr(opts, key):
            srun.append(f"--{key.replace('_', '-')}={shlex.quote(getattr(opts, key))}")
    torchrun = [shell_word(a) for a in _spec(opts, nproc).torchrun_argv(gptforge_target([]))]
    requeue = ('  echo "gptforge: job $SLURM_JOB_ID stopped by SIG$STOP_SIGNAL; requeueing it (the run resumes from its '
               'checkpoint)"\n  scontrol requeue "$SLURM_JOB_ID"' if not opts.no_requeue else
               '  echo "gptforge: job $SLURM_JOB_ID stopped by SIG$STOP_SIGNAL (--no-requeue: not requeued)"')
    lines = [" ".join(srun) + " \\", "  " + " ".join(torchrun) + " \\",
             "  " + shlex.join(with_resume(opts.command)) + " &",
             "SRUN_PID=$!",
             "# a trapped signal ends `wait` early: wait again until srun has ended, then take its status",
             'while kill -0 "$SRUN_PID" 2>/dev/null; do wait "$SRUN_PID" || true; done',
             'rc=0; wait "$SRUN_PID" || rc=$?',
             'if [ "$STOP_SIGNAL" = USR1 ]; then', requeue, "fi",
             'exit "$rc"']
    return lines


def main(opts: SlurmOptions) -> int:
    write_output(render(opts), opts.out, executable=True, submit_hint="submit with: sbatch")
    return 0
