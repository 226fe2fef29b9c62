"""The common end of the torchrun workers that compute cases on every rank (_outer_step_worker,
_powersgd_worker): the process group, each case's result, saved as <out>/rank<R>.pt, a clean exit."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from gptforge.config.schema import Config
from gptforge.parallel.exit import run_main
from gptforge.parallel.mesh import init_distributed, shutdown


def run_cases(cases: dict, compute) -> None:
    """compute(env, *args) for each name: args in `cases`; the results to sys.argv[1]/rank<R>.pt."""
    def main() -> int:
        env = init_distributed(Config().parallel, "cpu")
        result = {name: compute(env, *args) for name, args in cases.items()}
        torch.save(result, Path(sys.argv[1]) / f"rank{env.rank}.pt")
        shutdown(env)
        return 0

    sys.exit(run_main(main))
