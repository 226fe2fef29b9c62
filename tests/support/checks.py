"""Assertions shared by test files: a folder's file digests, the one-line error of a command, equal weights."""

from __future__ import annotations

import hashlib
import os
import resource
import subprocess
import sys
from pathlib import Path

import torch

from gptforge.checkpoint import load_model


def tree_digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file()}


def one_line_error(err: str) -> str:
    lines = [x for x in err.strip().splitlines() if x.startswith("gptforge: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _limit_address_space(limit: int) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def run_gptforge(*args: str, cwd: Path | None = None, timeout: float = 120, memory: int = 2 * 1024**3,
                 env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m gptforge ARGS` in a child whose address space is capped (2 GiB), so an input that makes it grow
    without bound fails fast (MemoryError, a killed child) instead of eating the machine."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "gptforge", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, env=env, preexec_fn=lambda: _limit_address_space(memory))


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_model(Path(ckpt)).state_dict()


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
