"""`gptforge launch`: build and run the torchrun command for this node (or, with --hostfile, for all nodes).

    gptforge launch --nnodes 2 --node-rank 0 --master-addr 10.0.0.1 --iface eth0 -- pretrain --config c.toml
    gptforge launch --nnodes 2 --node-rank 1 --master-addr 10.0.0.1 --iface eth0 -- pretrain --config c.toml
    gptforge launch --hostfile hosts.txt -- pretrain --config c.toml      # every host over ssh
    gptforge launch ... --dry-run      # print the environment and the command, copy-pasteable

The command after ``--`` is a gptforge command (``pretrain ...`` -> ``-m gptforge pretrain ...``), a
script (``examples/tp_dp_mlp.py ...``) or a module (``-m pkg.mod ...``).

Multi-node runs use torchrun's c10d rendezvous hosted by node 0 (``--rdzv-conf=is_host=1``) on
``--master-addr:--master-port``; nodes may start up to ``--rdzv-timeout`` seconds apart. Global ranks
are assigned by the rendezvous (ordered by node address), so ``--node-rank`` picks the node that hosts
the rendezvous, not the ranks' order. ``--max-restarts=0``: a rank that dies ends the job. The agent
on its node stops its other workers at once; the ranks on other nodes see their peer's sockets close
and fail within the collective timeout (the training config's ``parallel.timeout_s``, or
``--collective-timeout`` when given) when a whole machine disappears. The launcher then prints which
rank on which node failed first (gptforge.launch.failures). ``--max-restarts=N``: torchrun restarts the
workers up to N times instead, and they resume from the newest complete checkpoint.

SIGTERM, SIGINT, SIGHUP or SIGUSR1 to `launch` go to torchrun, which passes them to its workers: every
rank finishes its step, they save a checkpoint and exit (gptforge.train.preempt); torchrun waits the
training config's ``train.grace_s`` plus SHUTDOWN_MARGIN seconds before it kills them. `launch` then
prints the workers' "stopped by ..." line and exits with 128 + the signal's number (143 for SIGTERM).
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import sys

from gptforge import hardware
from gptforge.config.schema import TrainSection
from gptforge.errors import UserError
from gptforge.launch import netutil
from gptforge.launch.doctor.command import main as doctor_main
from gptforge.launch.doctor.options import DoctorOptions
from gptforge.launch.hostfile import run_hostfile
from gptforge.launch.jobfile import ELASTIC_SIGNALS, shutdown_timeout, train_grace_s
from gptforge.launch.node import NodeFlags, NodeSpec, gptforge_target
from gptforge.launch.options import LaunchOptions
from gptforge.launch.process import run_torchrun

PYTHON_TORCHRUN = (sys.executable, "-m", "torch.distributed.run")


def validate(opts: LaunchOptions) -> None:
    if not opts.command:
        raise UserError("no command to launch: put it after --, e.g. `gptforge launch --nnodes 2 ... -- pretrain "
                        "--config configs/small.toml`")
    if opts.max_restarts < 0:
        raise UserError(f"--max-restarts must be 0 (a rank that dies ends the job) or more, got {opts.max_restarts}")
    if opts.hostfile:
        return
    opts.check_node()
    if opts.iface:
        netutil.require_iface(opts.iface)
    if opts.rdzv_timeout < 1:
        raise UserError(f"--rdzv-timeout must be at least 1 second, got {opts.rdzv_timeout}")
    # torchrun retries an unresolvable master for minutes whatever --rdzv-timeout says: resolve it here
    if not opts.dry_run:
        netutil.resolve(opts.master(), timeout=min(netutil.RESOLVE_TIMEOUT_S, opts.rdzv_timeout))


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()  # NVML / HIP query, creates no CUDA context
    except Exception:
        return 0


def _rocm_env(env: dict[str, str]) -> None:
    """HSA override for consumer RDNA cards, detected without creating a GPU context (KFD topology)."""
    try:
        import torch

        if getattr(torch.version, "hip", None) is None:
            return
    except Exception:
        return
    arch = hardware.rocm_arch_from_kfd()
    if arch and not os.environ.get("HSA_OVERRIDE_GFX_VERSION"):
        val = hardware.hsa_override(arch)
        if val:
            env["HSA_OVERRIDE_GFX_VERSION"] = val


def target_argv(cmd: list[str]) -> list[str]:
    """`pretrain ...` -> `-m gptforge pretrain ...`; `x.py ...` -> `x.py ...`; `-m mod ...` kept."""
    if cmd[0] == "-m":
        if len(cmd) < 2:
            raise UserError("`-m` after -- needs a module name")
        return cmd
    if cmd[0].endswith(".py"):
        if not os.path.exists(cmd[0]):
            raise UserError(f"script {cmd[0]} not found (relative to {os.getcwd()})")
        return cmd
    if cmd[0] in ("gptforge", "python", sys.executable):
        raise UserError(f"give the gptforge command itself after --, e.g. `-- pretrain ...`, not `-- {cmd[0]} ...`")
    return gptforge_target(cmd)


def node_spec(opts: LaunchOptions) -> NodeSpec:
    nproc = opts.nproc_per_node or max(1, _gpu_count())
    local_addr = opts.local_addr
    if opts.nnodes > 1 and not local_addr and opts.iface:
        local_addr = netutil.require_iface(opts.iface)
    return NodeSpec(nnodes=opts.nnodes, node_rank=opts.node_rank, nproc_per_node=nproc, master_addr=opts.master(),
                    master_port=opts.master_port, iface=opts.iface, no_ib=opts.no_ib, rdzv_id=opts.rdzv_id,
                    rdzv_timeout=opts.rdzv_timeout, local_addr=local_addr, collective_timeout=opts.collective_timeout,
                    max_restarts=opts.max_restarts)


def node_env(spec: NodeSpec, grace_s: float = TrainSection.grace_s) -> dict[str, str]:
    """The variables added to torchrun's environment. The collective timeout only when --collective-timeout
    is given: otherwise the trainer uses the config's parallel.timeout_s (or the user's own variable)."""
    env = spec.network_env()
    env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] = os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT",
                                                           str(shutdown_timeout(grace_s)))
    env["PET_SIGNALS_TO_HANDLE"] = os.environ.get("PET_SIGNALS_TO_HANDLE", ELASTIC_SIGNALS)
    if spec.max_restarts > 0:
        # torchrun's agent keeps one TCP store for all restarts by default, and the restarted workers read
        # the previous attempt's addresses from it (gloo "connectFullMesh ... Connection refused", NCCL the
        # same; pytorch/pytorch#135712): a fresh store for every attempt, hosted by rank 0
        env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = os.environ.get("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    env["GPTFORGE_NODE_RANK"] = str(spec.node_rank)
    env["GPTFORGE_NNODES"] = str(spec.nnodes)
    if not os.environ.get("OMP_NUM_THREADS") and _gpu_count() == 0:
        # torchrun would give each process 1 thread; on CPU give each its share of the cores
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // spec.nproc_per_node))
    _rocm_env(env)
    return env


def format_dry_run(env: dict[str, str], argv: list[str]) -> str:
    lines = [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
    words = [shlex.quote(a) for a in argv]
    # one argument (or flag=value) per line, joined with shell continuations
    body, i = [], 0
    first = " ".join(words[:3])  # python -m torch.distributed.run
    rest = words[3:]
    while i < len(rest):
        if (rest[i] == "-m" and i + 1 < len(rest)) or rest[i].endswith(".py"):
            body.append(" ".join(rest[i:]))  # the target command stays on one line
            break
        body.append(rest[i])
        i += 1
    lines.append(" \\\n  ".join([first, *body]))
    return "\n".join(lines)


def main(opts: LaunchOptions) -> int:
    validate(opts)
    if opts.hostfile:
        return run_hostfile(opts)
    spec = node_spec(opts)
    env = node_env(spec, train_grace_s(opts.command))
    argv = spec.torchrun_argv(target_argv(opts.command), PYTHON_TORCHRUN)
    if opts.dry_run:
        print(format_dry_run(env, argv))
        return 0
    if opts.check:
        node = {f.name: getattr(opts, f.name) for f in dataclasses.fields(NodeFlags)}
        rc = doctor_main(DoctorOptions(**{**node, "master_addr": opts.master(), "wait": float(opts.wait)}))
        if rc != 0:
            print("gptforge launch: doctor found problems (FAIL above); not launching", file=sys.stderr)
            return rc
    if spec.local_addr or opts.node_rank == 0:  # the address the other nodes know this one by (record_peers)
        env["GPTFORGE_LOCAL_ADDR"] = spec.local_addr or spec.master_addr
    return run_torchrun(argv, env, opts.node_rank, watch_stdin=opts.watch_stdin, port=opts.master_port,
                        max_restarts=opts.max_restarts)
