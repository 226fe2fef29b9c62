"""`gptforge doctor` options: the node flags of `gptforge launch` plus the checks' settings."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Literal

import tyro

from gptforge.launch.node import NodeFlags


@dataclasses.dataclass
class DoctorOptions(NodeFlags):
    """Check GPUs, network and peers before a (multi-node) run. Run on every node with the same flags as
    `gptforge launch`."""

    wait: Annotated[float, tyro.conf.arg(aliases=["--timeout"])] = 120
    """seconds to wait for the master / the other nodes (alias --timeout)"""
    preset: str = "tiny"
    """model preset for the memory and accumulation advice"""
    global_batch: int = 256
    """sequences per optimizer step for the advice"""
    seq_len: int | None = None
    """context length for the advice (default: the preset's)"""
    bandwidth_mb: float = 64
    """all-reduce payload in MB for the bandwidth test"""
    connect_timeout: float = 5
    """seconds per connection attempt to the master"""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """collective backend for the all-reduce test (auto: nccl with GPUs, else gloo)"""
    skew_warn: float = 0.5
    """clock skew in seconds that gives a WARN"""
