"""Next-token cross-entropy for pretraining and SFT (labels = -100 are not counted)."""

from __future__ import annotations

import torch.nn.functional as F


class LMObjective:
    name = "lm"

    def __call__(self, model, batch: dict):
        logits = model(batch["input_ids"], attn_mask=batch.get("attn_mask"), positions=batch.get("positions"))
        labels = batch["labels"]
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100)
        return loss, {}
