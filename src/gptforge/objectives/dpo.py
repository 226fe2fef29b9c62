"""Direct preference optimisation (Rafailov et al. 2023), with conservative label smoothing (cDPO).

    h = beta * [(log pi(y_c|x) - log pi(y_r|x)) - (log ref(y_c|x) - log ref(y_r|x))]
    loss = -(1 - eps) * log sigmoid(h) - eps * log sigmoid(-h)          (= ln 2 while pi == ref)

The reference is the frozen starting model. Its log-probs are either precomputed in one pass before
training (`precompute_reference`: the reference model is then freed: no second model in memory) and
arrive in the batch as `ref_logps`, or computed live by a frozen copy (`ref_model`).
Metrics: reward margin and accuracy (implicit rewards beta * (log pi - log ref)), chosen/rejected
log-probs of the policy."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from gptforge.objectives.head import token_loss


def sequence_logps(model, batch: dict, loss_impl: str = "plain") -> torch.Tensor:
    """Sum of log p(label) over the counted (label != -100) tokens of each row -> (rows,) float32.
    loss_impl liger uses chunked here (per-token log-probs; gptforge.objectives.head)."""
    impl = "chunked" if loss_impl == "liger" else loss_impl
    return -token_loss(model, batch, impl, "none").sum(-1)


class DPOObjective:
    name = "dpo"

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0, ref_model=None, loss_impl: str = "plain"):
        # beta > 0, label_smoothing in [0, 0.5): dpo.beta / dpo.label_smoothing, checked with the config
        # (DPOSection.check) before anything is built; the DPO recipe is the only caller outside the tests
        self.beta, self.ls, self.ref_model, self.loss_impl = beta, label_smoothing, ref_model, loss_impl

    def reference_logps(self, batch: dict) -> torch.Tensor:
        if "ref_logps" in batch:
            return batch["ref_logps"].float()
        if self.ref_model is None:
            raise RuntimeError("DPO needs ref_logps in the batch (precomputed) or a reference model")
        with torch.no_grad():
            return sequence_logps(self.ref_model, batch, self.loss_impl).detach()

    def __call__(self, model, batch: dict):
        logps = sequence_logps(model, batch, self.loss_impl)
        ref = self.reference_logps(batch)
        B = logps.shape[0] // 2
        pc, pr, rc, rr = logps[:B], logps[B:], ref[:B], ref[B:]
        h = self.beta * ((pc - pr) - (rc - rr))
        losses = -(1 - self.ls) * F.logsigmoid(h) - self.ls * F.logsigmoid(-h)
        reward_c, reward_r = self.beta * (pc - rc).detach(), self.beta * (pr - rr).detach()
        metrics = {"reward_margin": (reward_c - reward_r).mean(), "reward_acc": (reward_c > reward_r).float().mean(),
                   "reward_chosen": reward_c.mean(), "reward_rejected": reward_r.mean(),
                   "logps_chosen": pc.detach().mean(), "logps_rejected": pr.detach().mean()}
        return losses.mean(), metrics


@torch.no_grad()
def precompute_reference(model, loader, env, micro_batch: int, autocast_ctx=None, progress: bool = False,
                         loss_impl: str = "plain") -> np.ndarray:
    """Reference log-probs of every pair of `loader` (a PairLoader) with `model` (plain, unwrapped).

    Each rank scores its share of the pairs; one all-reduce gives every rank the whole table. The
    same autocast as training is used, so at step 0 the policy's log-probs match the reference's."""
    import contextlib

    import torch.distributed as dist

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    table = torch.zeros(len(loader.pairs), 2, dtype=torch.float64, device=device)
    for idx, batch in loader.iter_all(micro_batch, env.dp_rank, env.dp_size):
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast_ctx() if autocast_ctx else contextlib.nullcontext():
            lp = sequence_logps(model, batch, loss_impl).double()
        B = len(idx)
        t = torch.as_tensor(idx, device=device)
        table[t, 0], table[t, 1] = lp[:B], lp[B:]
    if env.distributed and dist.is_initialized():
        # tp ranks of one dp group hold the same share: count each dp group once
        if env.tp_size > 1:
            table /= env.tp_size
        dist.all_reduce(table, op=dist.ReduceOp.SUM)
    model.train(was_training)
    return table.cpu().numpy()
