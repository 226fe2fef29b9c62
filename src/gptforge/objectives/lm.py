"""Next-token cross-entropy for pretraining and SFT (labels = -100 are not counted).

With `loss_denom` in the batch (SFT loaders), the loss is the sum over label tokens divided by it, so a
step's loss is the mean over all label tokens of the step on all ranks and micro-steps (see data/sft.py)."""

from __future__ import annotations

import torch.nn.functional as F


class LMObjective:
    name = "lm"

    def __call__(self, model, batch: dict):
        logits = model(batch["input_ids"], attn_mask=batch.get("attn_mask"), positions=batch.get("positions"))
        labels = batch["labels"]
        flat, flat_labels = logits.float().view(-1, logits.size(-1)), labels.reshape(-1)
        denom = batch.get("loss_denom")
        if denom is not None:
            return F.cross_entropy(flat, flat_labels, ignore_index=-100, reduction="sum") / denom, {}
        loss = F.cross_entropy(flat, flat_labels, ignore_index=-100)
        return loss, {}
