"""Per-step logging: TensorBoard scalars, metrics.jsonl, wandb; durations for the log line."""

from __future__ import annotations

import json
import time
from pathlib import Path

from gptforge.errors import UserError


def fmt_duration(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class MetricsLogger:
    """Rank 0 only: TensorBoard (optional), metrics.jsonl (always: tests and tools read it), wandb (optional)."""

    def __init__(self, out_dir: Path, enabled: bool, tensorboard: bool, wandb: bool, config: dict):
        self.enabled = enabled
        self.tb = self.wb = None
        self.jsonl = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(out_dir / "metrics.jsonl", "a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tb"))
        if wandb:
            try:
                import wandb as wb
            except ImportError:
                raise UserError("train.wandb=true but wandb is not installed; pip install wandb") from None
            self.wb = wb.init(project="gptforge", config=config, dir=str(out_dir))

    def log(self, step: int, scalars: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, "time": time.time()} | scalars) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.wb is not None:
            self.wb.log(scalars, step=step)

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.wb is not None:
            self.wb.finish()
