"""No host-device sync inside a non-log step (gptforge.train.stepsync), proven on a real tiny run.

Every read of a tensor's value by the host is recorded: at the Python level (TorchFunctionMode: .tolist(), .item(),
bool/float/int of a tensor) and at the dispatcher (TorchDispatchMode: aten._local_scalar_dense, aten.is_nonzero,
what .item() and bool() dispatch to), each with the step the training loop is in (read from the Trainer's frame).
Not counted: reads of the trainer's host staging buffers (filled by a non-blocking copy: on a GPU reading them
waits for the previous step's copy only) and the data loader (host tensors by design)."""

from __future__ import annotations

import sys

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import read_losses, tiny_args
from gptforge.cli import main
from gptforge.train.trainer import Trainer

READS = {"tolist", "item", "__bool__", "__float__", "__int__", "__index__", "numpy"}
SCALAR_OPS = {"aten._local_scalar_dense.default", "aten.is_nonzero.default"}


def where() -> tuple[int, Trainer | None] | None:
    """(the step the loop is working on, the trainer), or None outside the loop / inside the data loader."""
    f, in_step = sys._getframe(2), False
    while f is not None:
        name = f.f_code.co_name
        if name == "next_batch":
            return None
        in_step = in_step or name == "train_step"
        if name == "fit" and isinstance(f.f_locals.get("self"), Trainer):
            tr = f.f_locals["self"]
            return tr.step + (1 if in_step else 0), tr
        f = f.f_back
    return None


class Reads(TorchFunctionMode):
    def __init__(self, log: list):
        super().__init__()
        self.log = log

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in READS and args and torch.is_tensor(args[0]) and (w := where()) is not None:
            step, tr = w
            bufs = getattr(getattr(tr, "stepsync", None), "bufs", {})
            if not any(args[0] is b for b in bufs.values()):
                self.log.append((step, name))
        return func(*args, **(kwargs or {}))


class ScalarOps(TorchDispatchMode):
    def __init__(self, log: list):
        super().__init__()
        self.log = log

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) in SCALAR_OPS and (w := where()) is not None:
            self.log.append((w[0], str(func)))
        return func(*args, **(kwargs or {}))


def test_non_log_steps_never_read_the_device(tmp_path, char_data):
    log: list = []
    run = tmp_path / "run"
    with Reads(log), ScalarOps(log):
        assert main(["pretrain", *tiny_args(run, char_data, "--train.max_steps=12", "--train.log_every=5")]) == 0
    by_step: dict[int, list] = {}
    for step, what in log:
        by_step.setdefault(step, []).append(what)
    log_steps = {1, 5, 10, 12}  # step 1, every 5th, the last (which also saves)
    quiet = {s: by_step.get(s, []) for s in range(2, 12) if s not in log_steps}
    assert all(not reads for reads in quiet.values()), f"host reads of device tensors on non-log steps: {({s: sorted(set(r)) for s, r in quiet.items() if r})}"
    for s in log_steps:
        assert by_step.get(s), f"step {s} is a log step but nothing was read: {by_step}"
    assert len(read_losses(run)) == 12  # every step's loss was still read and logged (one step late)


def test_lagged_losses_equal_the_every_step_reads(tmp_path, char_data):
    """The same seed with a read on every step (log_every=1) and one step late (log_every=5): same losses, bit
    for bit, and the same weights at the end."""
    from support.checks import assert_same_weights

    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["pretrain", *tiny_args(a, char_data, "--train.max_steps=8", "--train.log_every=1")]) == 0
    assert main(["pretrain", *tiny_args(b, char_data, "--train.max_steps=8", "--train.log_every=5")]) == 0
    assert read_losses(a) == read_losses(b) and len(read_losses(a)) == 8
    assert_same_weights(a / "checkpoints/step_0000008", b / "checkpoints/step_0000008")
