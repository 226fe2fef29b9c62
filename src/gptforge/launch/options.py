"""`gptforge launch` options (the node flags are shared with `gptforge doctor`, gptforge.launch.node)."""

from __future__ import annotations

import dataclasses
from typing import Annotated

import tyro

from gptforge.launch.node import DEFAULT_RDZV_TIMEOUT, NodeFlags
from gptforge.options import Passthrough


@dataclasses.dataclass
class LaunchOptions(NodeFlags):
    """Build and run the torchrun command for this node (or, with --hostfile, for every node over ssh).
    Put the training command after --, e.g. `gptforge launch --nnodes 2 --node-rank 0 --master-addr
    10.0.0.1 --iface eth0 -- pretrain --config configs/small.toml`."""

    no_ib: bool = False
    """disable InfiniBand in NCCL (NCCL_IB_DISABLE=1): plain Ethernet"""
    rdzv_timeout: int = DEFAULT_RDZV_TIMEOUT
    """seconds to wait for all nodes to join"""
    rdzv_id: str = "gptforge"
    """job id, the same on every node"""
    local_addr: str | None = None
    """this node's address as the others reach it (default: the address of --iface)"""
    collective_timeout: int | None = None
    """seconds a collective may wait for a dead peer (GPTFORGE_COLLECTIVE_TIMEOUT_S); default: the training
    config's parallel.timeout_s"""
    max_restarts: int = 0
    """restart the workers up to N times when one dies (torchrun --max-restarts); they resume from the newest
    complete checkpoint. 0: a rank that dies ends the job"""
    dry_run: bool = False
    """print the environment and command (one per line) and exit"""
    check: bool = False
    """run `gptforge doctor` with the same node flags first"""
    wait: int = 120
    """with --check: seconds doctor waits for the other nodes"""
    hostfile: str | None = None
    """file of lines 'host [slots=N] [iface=IF]': start every node over ssh, node 0 = first host"""
    ssh_option: Annotated[list[str], tyro.conf.arg(aliases=["-o"]), tyro.conf.UseAppendAction] = \
        dataclasses.field(default_factory=list)
    """extra ssh -o option for --hostfile (repeatable), e.g. -o Port=2222"""
    ssh_config: str | None = None
    """ssh -F config file for --hostfile"""
    remote_python: str | None = None
    """python on the remote hosts for --hostfile (default: this one, same path)"""
    remote_cwd: str | None = None
    """working directory on the remote hosts (default: this one)"""
    watch_stdin: bool = False
    """internal (set by --hostfile on every node): stop when stdin closes"""
    command: Passthrough = dataclasses.field(default_factory=list)
