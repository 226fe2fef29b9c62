"""Completing a checkpoint: every rank agrees its write succeeded (or all stop with one error, disk full
named with the space needed), rank 0 writes trainer_state.json last and renames step_N.partial to step_N,
then only the current run's older checkpoints are rotated away."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from gptforge.errors import UserError
from gptforge.parallel.mesh import all_true, barrier

STATE_FILE = "trainer_state.json"  # written last: its presence marks a complete checkpoint
_STEP_RE = re.compile(r"^step_(\d+)$")


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints under out_dir/checkpoints, oldest first."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_RE.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


class PendingSave:
    """A checkpoint whose tensors are (being) written to step_N.partial. finish() waits for them, then rank 0
    writes the small files and trainer_state.json last, renames the folder and rotates this run's older ones.
    A failure on any rank stops every rank with the same error; the .partial is removed, older ones kept."""

    def __init__(self, root: Path, step: int, env, state: dict, files: dict, keep_last: int):
        self.root, self.step, self.env, self.state, self.files, self.keep_last = root, step, env, state, files, keep_last
        self.partial, self.final = root / f"step_{step:07d}.partial", root / f"step_{step:07d}"
        self.future, self.error, self.nbytes, self.agreed = None, None, 0, False

    def done(self) -> bool:
        """This rank's background write has ended (successfully or not); no communication."""
        return self.future is None or self.future.done()

    def agree(self) -> None:
        """Wait for this rank's write; every rank raises the same UserError if any rank failed."""
        if self.agreed:
            return
        self.agreed = True
        if self.future is not None:  # DCP's async_save: torch.distributed.checkpoint is imported
            from torch.distributed.checkpoint.api import CheckpointException
            try:
                self.future.result()
            except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP's is a BaseException
                self.error = e
            self.future = None
        self._settle(self.error)

    def _settle(self, error) -> None:
        if all_true(error is None, self.env):
            return
        if self.env.distributed:  # every rank's view: the first rank with an error names it
            errs = [None] * self.env.world_size
            dist.all_gather_object(errs, None if error is None else _save_error_text(error))
            text = next(e for e in errs if e)
        else:
            text = _save_error_text(error)
        if self.env.is_main:
            shutil.rmtree(self.partial, ignore_errors=True)
        barrier(self.env)
        need = self.nbytes + sum(len(c) for c in self.files.values())
        if text.startswith("ENOSPC"):
            free = shutil.disk_usage(self.root).free
            raise UserError(f"no space left in '{self.root}' for checkpoint {self.final.name}: it needs about "
                            f"{_mb(need)}, {_mb(free)} are free; the partial save was removed and the previous "
                            "checkpoint kept; free space (or set a train.out_dir on a larger disk) and resume "
                            "with --train.resume=auto")
        raise UserError(f"saving checkpoint {self.final} failed ({text[:300]}); the partial save was removed and "
                        "the previous checkpoint kept")

    def finish(self) -> Path:
        self.agree()
        error = None
        if self.env.is_main:
            try:
                for name, content in self.files.items():
                    (self.partial / name).write_bytes(content if isinstance(content, bytes) else content.encode())
                (self.partial / STATE_FILE).write_text(json.dumps(self.state, indent=2))
                _fsync_dir(self.partial)
                if self.final.exists():
                    shutil.rmtree(self.final)
                os.replace(self.partial, self.final)
                _fsync_dir(self.root)
            except OSError as e:
                error = e
        self._settle(error)
        if self.env.is_main:
            rotate(self.root.parent, self.step, self.state.get("run_id"), self.keep_last)
        barrier(self.env)
        return self.final


def run_checkpoints(out_dir: str | Path, run_id, up_to_step: int | None = None) -> list[Path]:
    """The complete checkpoints of run `run_id` under out_dir (up to `up_to_step`), oldest first: the one
    answer to "which checkpoints belong to this run" (rotation, rollback, a new run's out_dir check)."""
    mine = []
    for p in list_checkpoints(out_dir):
        try:
            ts = json.loads((p / STATE_FILE).read_text())
        except (OSError, ValueError):
            continue
        if ts.get("run_id") == run_id and (up_to_step is None or int(ts.get("step", -1)) <= up_to_step):
            mine.append(p)
    return mine


def rotate(out_dir: Path, step: int, run_id, keep_last: int) -> None:
    """Delete this run's checkpoints older than the newest keep_last up to `step`; never one of another run
    (another run_id) nor one with a higher step (a resume from an older checkpoint keeps the newer ones)."""
    if keep_last <= 0:
        return
    for old in run_checkpoints(out_dir, run_id, step)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def state_nbytes(tree) -> int:
    """Bytes of the tensors in a (nested) state dict, global sizes for sharded tensors: a checkpoint's size."""
    if torch.is_tensor(tree):
        return tree.numel() * tree.element_size()
    if isinstance(tree, dict):
        return sum(state_nbytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(state_nbytes(v) for v in tree)
    return 0


def _save_error_text(e: BaseException) -> str:
    """'ENOSPC ...' when the disk (or quota) is full anywhere in the exception's chain, else its text."""
    seen, todo = [], [e]
    while todo:
        x = todo.pop()
        if x is None or any(x is y for y in seen):
            continue
        seen.append(x)
        if isinstance(x, OSError) and x.errno in (errno.ENOSPC, errno.EDQUOT):
            return f"ENOSPC {x}"
        if "No space left" in str(x) or "unexpected pos" in str(x):
            return f"ENOSPC {x}"
        todo += [x.__cause__, x.__context__] + list(getattr(x, "failures", {}).values())
    return " ".join(str(e).split()) or type(e).__name__


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n < 1e9 else f"{n / 1e9:.2f} GB"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
