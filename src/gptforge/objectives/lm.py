"""Next-token cross-entropy for pretraining and SFT (labels = -100 are not counted).

With `loss_denom` in the batch (SFT loaders), the loss is the sum over label tokens divided by it, so a
step's loss is the mean over all label tokens of the step on all ranks and micro-steps (see data/sft.py)."""

from __future__ import annotations

from gptforge.objectives.head import token_loss


class LMObjective:
    """loss_impl: plain | chunked | liger (gptforge.objectives.head; resolved from train.loss_impl)."""

    name = "lm"

    def __init__(self, loss_impl: str = "plain", chunk_rows: int | None = None):
        self.loss_impl, self.chunk_rows = loss_impl, chunk_rows

    def __call__(self, model, batch: dict):
        denom = batch.get("loss_denom")
        if denom is not None:
            return token_loss(model, batch, self.loss_impl, "sum", self.chunk_rows) / denom, {}
        return token_loss(model, batch, self.loss_impl, "mean", self.chunk_rows), {}
