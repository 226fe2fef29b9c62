"""Knowledge distillation (Hinton et al. 2015): the student learns the teacher's next-token distribution.

    KL  = tau^2 * sum_v p_t(v) * (log p_t(v) - log q_s(v)),  p_t = softmax(z_t / tau), q_s = softmax(z_s / tau)
    CE  = -log softmax(z_s)[label]                                   (the ordinary LM loss, temperature 1)
    loss = alpha * KL + (1 - alpha) * CE

per counted token (label != -100), averaged over them (or summed and divided by the batch's loss_denom, as
LMObjective does for SFT). Forward KL(teacher || student); tau^2 keeps the gradient's size independent of tau.

Both distributions are over the real vocabulary only (the tokenizer's ids, `vocab`): the rows either model pads
its vocabulary with are never compared (the teacher and the student may pad differently); ids the teacher has no
output row for (`teacher_vocab` < vocab: a Hugging Face folder's extra special tokens) get teacher probability 0.

Memory: the student's head runs inside its forward (GPT.forward(head=...)) on its final hidden states, and the
teacher's forward returns its final hidden states, not logits. The logits of both exist one chunk of rows at a
time (fp32 inside the chunk), each chunk under torch.utils.checkpoint (its logits recomputed in backward), so no
(B, T, vocab) tensor is ever held. The teacher runs frozen in inference mode.

In eval mode (the Trainer's validation) the loss is the student's CE alone: a validation loss comparable with
a pretrain or sft run's, and no teacher forward."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from gptforge.model.gpt import soft_cap
from gptforge.objectives.head import _compute_dtype, _upcast, default_chunk_rows, linear_cross_entropy, model_inputs

def _logits(h: torch.Tensor, w: torch.Tensor, dtype: torch.dtype, vocab: int, cap: float) -> torch.Tensor:
    z = _upcast(F.linear(h.to(dtype), w[:vocab].to(dtype)))
    return soft_cap(z, cap) if cap else z


def _chunk_terms(hs, ws, ht, wt, y, dtype, tdtype, vocab, teacher_vocab, tau, cap, tcap):
    """(sum of KL over the chunk's counted rows, sum of CE over them) for one chunk of rows -> (2,) fp32/fp64."""
    zs = _logits(hs, ws, dtype, vocab, cap)
    with torch.no_grad():
        zt = _logits(ht, wt, tdtype, min(vocab, teacher_vocab), tcap).to(zs.dtype)
        if teacher_vocab < vocab:  # ids without a teacher row: probability 0
            zt = F.pad(zt, (0, vocab - teacher_vocab), value=float("-inf"))
        log_pt = F.log_softmax(zt / tau, dim=-1)
        pt = log_pt.exp()
        neg_entropy = torch.where(pt > 0, pt * log_pt, 0.0).sum(-1)
    valid = y != -100
    kl = (neg_entropy - (pt * F.log_softmax(zs / tau, dim=-1)).sum(-1)) * (tau * tau)
    ce = F.cross_entropy(zs, y, ignore_index=-100, reduction="sum")
    return torch.stack([(kl * valid).sum(), ce])


def distill_terms(hs, ws, ht, wt, labels, *, vocab: int, teacher_vocab: int | None = None, tau: float = 1.0,
                  chunk_rows: int | None = None, softcap: float = 0.0, teacher_softcap: float = 0.0) -> torch.Tensor:
    """Student hidden states hs (..., D) and head weight ws (V_s, D), teacher's ht (..., D_t) and wt (V_t, D_t),
    labels (...) -> (2,) [sum of tau^2 KL(teacher || student), sum of CE] over the counted tokens, one chunk of
    rows' logits at a time. Under autocast the student's matmul runs in autocast's dtype (as lm_head would); the
    teacher's in its own weights' dtype (bf16 on a GPU)."""
    h, t, y = hs.reshape(-1, hs.shape[-1]), ht.reshape(-1, ht.shape[-1]), labels.reshape(-1)
    dtype = _compute_dtype(h) or h.dtype
    tdtype = wt.dtype if wt.dtype != torch.float32 else dtype
    rows = chunk_rows or default_chunk_rows(h.shape[0], vocab)
    fn = functools.partial(_chunk_terms, dtype=dtype, tdtype=tdtype, vocab=vocab,
                           teacher_vocab=teacher_vocab or vocab, tau=tau, cap=softcap, tcap=teacher_softcap)
    with torch.autocast(h.device.type, enabled=False):
        parts = [checkpoint(fn, h[s:s + rows], ws, t[s:s + rows], wt, y[s:s + rows], use_reentrant=False)
                 if torch.is_grad_enabled() else fn(h[s:s + rows], ws, t[s:s + rows], wt, y[s:s + rows])
                 for s in range(0, h.shape[0], rows)]
    return torch.stack(parts).sum(0)


def _hidden(h, w, softcap: float = 0.0):
    return h  # the `head` of the teacher's forward: its final hidden states, no logits


class DistillObjective:
    """alpha * tau^2 KL(teacher || student) + (1 - alpha) * CE; teacher: a plain GPT (frozen, eval mode).
    vocab: the tokenizer's vocabulary (the real ids); teacher_vocab: the teacher's real output rows (<= vocab)."""

    name = "distill"

    def __init__(self, teacher, vocab: int, alpha: float = 0.5, temperature: float = 1.0,
                 teacher_vocab: int | None = None, chunk_rows: int | None = None):
        self.teacher, self.vocab, self.alpha, self.tau = teacher, vocab, alpha, temperature
        self.teacher_vocab, self.chunk_rows = min(teacher_vocab or vocab, vocab), chunk_rows
        teacher.requires_grad_(False)
        teacher.eval()

    def teacher_hidden(self, batch: dict) -> torch.Tensor:
        kw = model_inputs(batch)
        with torch.inference_mode():
            h = self.teacher(batch["input_ids"], head=_hidden, **kw)
        return h.clone()  # out of inference mode: a plain tensor the student's chunks may keep for backward

    def __call__(self, model, batch: dict):
        kw = model_inputs(batch)
        labels = batch["labels"]
        denom = batch.get("loss_denom")
        denom = denom if denom is not None else (labels != -100).sum()
        if not model.training:  # validation: the student's own CE (no teacher needed)
            head = functools.partial(_ce_only, labels=labels, vocab=self.vocab, chunk_rows=self.chunk_rows)
            return model(batch["input_ids"], head=head, **kw) / denom, {}
        t = self.teacher
        head = functools.partial(distill_terms, ht=self.teacher_hidden(batch), wt=t.lm_head.weight, labels=labels,
                                 vocab=self.vocab, teacher_vocab=self.teacher_vocab, tau=self.tau,
                                 chunk_rows=self.chunk_rows, teacher_softcap=t.cfg.logit_softcap)
        kl, ce = (model(batch["input_ids"], head=head, **kw) / denom).unbind()
        loss = self.alpha * kl + (1 - self.alpha) * ce
        return loss, {"kl": kl.detach(), "ce": ce.detach()}


def _ce_only(h, w, labels, vocab, chunk_rows=None, softcap=0.0):
    """Sum of the CE over the real vocabulary (validation): the chunked CE of objectives.head on the real rows."""
    return linear_cross_entropy(h, w[:vocab], labels, "chunked", "sum", chunk_rows, softcap)
