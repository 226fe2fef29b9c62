"""One node of a multi-node run: the flags every launcher shares and the one ``NodeSpec`` that renders
the network environment (NCCL/Gloo interface, InfiniBand) and the torchrun command.

Used by `gptforge launch` (local torchrun and the SSH hostfile fan-out), `gptforge doctor`,
`gptforge slurm` and `gptforge k8s`. One flag vocabulary: ``--nnodes --node-rank --nproc-per-node
--master-addr --master-port --iface --no-ib --rdzv-timeout --rdzv-id``.

Rendezvous styles (``NodeSpec.rdzv``):
- ``c10d``: torchrun's c10d rendezvous on master:port (``launch``: node 0 hosts it with
  ``is_host=1``; Slurm: keyed by the job id). One node is ``--standalone``.
- ``static``: ``--node-rank``/``--master-addr``/``--master-port`` (Kubernetes Indexed Job).
- ``operator``: the environment set by an operator (Kubeflow PyTorchJob, ``PET_*``) gives everything.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from typing import Annotated

import tyro

from gptforge.errors import UserError

DEFAULT_PORT = 29500
DEFAULT_RDZV_TIMEOUT = 600
TORCHRUN = ("torchrun",)

_IFACE = re.compile(r"^[A-Za-z0-9_.:@-]{1,15}$")

MasterPort = Annotated[int, tyro.conf.arg(aliases=["--port"])]


@dataclasses.dataclass
class NodeFlags:
    """The node flags `gptforge launch` and `gptforge doctor` share (the same values on every node)."""

    nnodes: int = 1
    """number of nodes"""
    node_rank: int = 0
    """this node's rank, 0..nnodes-1; node 0 hosts the rendezvous"""
    nproc_per_node: int | None = None
    """processes on this node (default: number of GPUs, 1 on CPU)"""
    master_addr: str | None = None
    """address of node 0 on the network the nodes share (default: 127.0.0.1 on one node)"""
    master_port: MasterPort = DEFAULT_PORT
    """rendezvous port on node 0 (alias --port)"""
    iface: str | None = None
    """network interface the nodes talk over (sets NCCL_SOCKET_IFNAME and GLOO_SOCKET_IFNAME)"""

    def check_node(self) -> None:
        """Rank, count and master checks (no network access)."""
        if self.nnodes < 1:
            raise UserError(f"--nnodes must be >= 1, got {self.nnodes}")
        if not 0 <= self.node_rank < self.nnodes:
            raise UserError(f"--node-rank {self.node_rank} is out of range for --nnodes {self.nnodes}: "
                            f"use 0..{self.nnodes - 1} (node 0 hosts the rendezvous)")
        if self.nproc_per_node is not None and self.nproc_per_node < 1:
            raise UserError(f"--nproc-per-node must be >= 1, got {self.nproc_per_node}")
        if self.nnodes > 1 and not self.master_addr:
            raise UserError("--master-addr is required with --nnodes > 1: give node 0's address on the network the "
                            "nodes share (the same value on every node)")
        check_port(self.master_port)

    def master(self) -> str:
        return self.master_addr or "127.0.0.1"


@dataclasses.dataclass
class NodeSpec:
    """What a node runs. ``nnodes``, ``node_rank``, ``master_addr``, ``master_port`` and ``rdzv_id`` may be
    shell or Kubernetes expressions (``$SLURM_NNODES``, ``$(JOB_COMPLETION_INDEX)``) resolved on the node."""

    nnodes: int | str = 1
    node_rank: int | str | None = 0  # None: the rendezvous orders the nodes (Slurm)
    nproc_per_node: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int | str = DEFAULT_PORT
    iface: str | None = None
    no_ib: bool = False
    rdzv: str = "c10d"  # c10d | static | operator (see the module docstring)
    rdzv_id: str = "gptforge"
    rdzv_timeout: int = DEFAULT_RDZV_TIMEOUT
    local_addr: str | None = None
    collective_timeout: int | None = None  # only an explicit value: else the training config's timeout
    max_restarts: int = 0  # torchrun restarts the workers up to this many times (they resume: train.preempt)

    def network_env(self) -> dict[str, str]:
        """NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME, NCCL_IB_DISABLE and an explicit collective timeout."""
        env: dict[str, str] = {}
        if self.iface:
            env["NCCL_SOCKET_IFNAME"] = self.iface
            env["GLOO_SOCKET_IFNAME"] = self.iface
        if self.no_ib:
            env["NCCL_IB_DISABLE"] = "1"
        if self.collective_timeout is not None:
            env["GPTFORGE_COLLECTIVE_TIMEOUT_S"] = str(self.collective_timeout)
        return env

    def torchrun_flags(self) -> list[str]:
        if self.rdzv == "operator":
            return []
        flags = [f"--nnodes={self.nnodes}", f"--nproc-per-node={self.nproc_per_node}"]
        if self.rdzv == "static":
            return flags + [f"--node-rank={self.node_rank}", f"--master-addr={self.master_addr}",
                            f"--master-port={self.master_port}"]
        if self.nnodes == 1:
            return ["--standalone", *flags]
        conf = [f"join_timeout={self.rdzv_timeout}"]
        if isinstance(self.node_rank, int):
            conf.insert(0, f"is_host={1 if self.node_rank == 0 else 0}")
        # no --node-rank: the c10d rendezvous ignores it (and warns); GPTFORGE_NODE_RANK carries it
        flags += ["--rdzv-backend=c10d", f"--rdzv-endpoint={self.master_addr}:{self.master_port}",
                  f"--rdzv-id={self.rdzv_id}", f"--rdzv-conf={','.join(conf)}"]
        if self.local_addr:
            flags.append(f"--local-addr={self.local_addr}")
        return flags

    def torchrun_argv(self, target: list[str], program: tuple[str, ...] | list[str] = TORCHRUN) -> list[str]:
        """``program`` + torchrun flags + ``--max-restarts=N`` (0: a rank that dies ends the job; N: torchrun
        restarts every worker up to N times and they resume from the newest complete checkpoint) + the target."""
        return [*program, *self.torchrun_flags(), f"--max-restarts={self.max_restarts}", *target]


def gptforge_target(cmd: list[str]) -> list[str]:
    """A gptforge command as torchrun's target: ``pretrain ...`` -> ``-m gptforge pretrain ...``."""
    return ["-m", "gptforge", *cmd]


def shell_word(arg: str) -> str:
    """Quote for bash, keeping ``$VAR`` expansions: ``--nnodes=$SLURM_NNODES`` -> ``--nnodes="$SLURM_NNODES"``."""
    if "$" not in arg:
        return shlex.quote(arg)
    key, eq, value = arg.partition("=")
    if eq and key.startswith("-"):
        return f'{key}="{value}"'
    return f'"{arg}"'


def check_port(port: int, prog: str = "") -> None:
    if not 0 < port < 65536:
        raise UserError(f"{prog}--master-port must be 1..65535, got {port}")


def check_iface_name(iface: str | None, prog: str = "") -> None:
    """Syntax only: for files generated to run elsewhere (the interface exists on the nodes, not here)."""
    if iface is not None and not _IFACE.match(iface):
        raise UserError(f"{prog}--iface '{iface}' is not a network interface name (see 'ip -br addr')")
