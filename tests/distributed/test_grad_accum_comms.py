"""Gradient accumulation sends no gradient collective on non-final micro-steps (DDP no_sync, FSDP2
set_requires_gradient_sync(False)); the final micro-step does (and FSDP2's all-gathers are still seen
on every micro-step, so the counter does see collectives there)."""

from __future__ import annotations

import json

import pytest

from distributed._harness import ROOT, check_clean, run, torchrun_argv

pytestmark = pytest.mark.timeout(180)

GRAD_OPS = ("allreduce", "all_reduce", "reduce_scatter")


def _grad_ops(ops):
    return [o for o in ops if o == "ddp_comm_hook" or any(g in o for g in GRAD_OPS)]


def test_no_gradient_communication_on_non_final_micro_steps():
    job = run(torchrun_argv(2, [str(ROOT / "tests" / "distributed" / "_comm_worker.py")]), timeout=150)
    check_clean(job)
    line = next(ln for ln in job.output.splitlines() if ln.startswith("COMMS "))
    comms = json.loads(line[len("COMMS "):])
    for strategy in ("ddp", "fsdp"):
        steps = comms[strategy]
        assert len(steps) == 4
        for i in range(3):
            assert _grad_ops(steps[i]) == [], f"{strategy} micro-step {i} communicated gradients: {steps[i]}"
        assert _grad_ops(steps[3]), f"{strategy}: no gradient collective on the final micro-step: {steps[3]}"
    assert "ddp_comm_hook" in comms["ddp"][3] and any("allreduce" in o for o in comms["ddp"][3])
    assert any("reduce_scatter" in o for o in comms["fsdp"][3])
    assert all(any("allgather" in o or "all_gather" in o for o in s) for s in comms["fsdp"]), comms["fsdp"]
