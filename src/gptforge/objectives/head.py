"""The output head and its cross-entropy, without a full fp32 copy of the (B, T, vocab) logits.

train.loss_impl:
  plain    lm_head -> (B, T, V) logits -> .float() -> F.cross_entropy: the reference.
  chunked  only one chunk of rows' logits exists at a time. In fp32/fp64: torch's own
           F.linear_cross_entropy with LinearCrossEntropyOptions (gradients computed chunk by chunk in
           forward). Under bf16/fp16 autocast that op returns the loss in bf16 (6.2451 reads 6.25), so there
           each chunk is the plain path's own math (bf16 logits -> fp32 softmax): for the mean/sum loss in
           _ChunkedLinearCE, which computes each chunk's gradients in forward (as Liger and torch's op do: no
           recomputation), for DPO's per-token log-probs under torch.utils.checkpoint (recomputed in
           backward, as the gradient depends on the per-row DPO weights). The loss stays fp32.
  liger    Liger's fused linear + cross-entropy Triton kernel (CUDA/ROCm, `pip install liger-kernel`);
           DPO's per-token log-probs use `chunked` (Liger's loss returns a reduced loss).
  auto     liger where installed and on a GPU, else chunked when the vocabulary is much wider than the
           model (vocab >= 4 * d_model), else plain (a char-level vocab gains nothing from chunking).

Logit soft-capping (model.logit_softcap = c > 0: c * tanh(logits / c)): the model passes softcap=c to the
head; plain and chunked cap each chunk's logits in fp32 (torch's F.linear_cross_entropy has no soft-cap,
so fp32 uses _ChunkedLinearCE then); liger is not used with it (resolve_loss_impl says chunked instead).

The model applies the head inside its forward (GPT.forward(head=...)): under FSDP2 lm_head's unsharded
weight exists only there. Tensor parallel keeps the plain path: with sequence parallel the stream is
gathered by a hook on lm_head itself, which a head that reads only the weight would skip."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from gptforge.errors import UserError
from gptforge.model.gpt import soft_cap

LOSS_IMPLS = ("auto", "plain", "chunked", "liger")


@functools.cache
def _liger_loss_cls():
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except Exception:  # not installed, or no triton / GPU build
        return None
    return LigerFusedLinearCrossEntropyLoss


def resolve_loss_impl(setting: str, device: torch.device, vocab_size: int, d_model: int,
                      tp_size: int = 1, softcap: float = 0.0) -> tuple[str, str]:
    """-> (plain | chunked | liger, the reason in words). softcap: model.logit_softcap."""
    if setting not in LOSS_IMPLS:
        raise UserError(f"train.loss_impl must be one of {', '.join(LOSS_IMPLS)}, got {setting!r}")
    gpu = device.type == "cuda"  # ROCm builds report "cuda" too
    if setting == "liger" and not (gpu and _liger_loss_cls() is not None):
        raise UserError("train.loss_impl=liger needs the liger-kernel package and a CUDA/ROCm device "
                        f"({'not installed' if _liger_loss_cls() is None else 'device is ' + device.type}); "
                        "pip install liger-kernel, or use train.loss_impl=auto")
    if tp_size > 1:
        return "plain", ("tensor parallel keeps the plain loss (sequence parallel gathers lm_head's input "
                         "in a hook on lm_head)")
    if setting == "liger" and softcap:
        return "chunked", (f"train.loss_impl=liger, but model.logit_softcap={softcap:g}: gptforge does not run "
                           "Liger's kernel with soft-capping (not verified equal), chunked instead")
    if setting != "auto":
        return setting, "train.loss_impl"
    if gpu and _liger_loss_cls() is not None:
        if not softcap:
            return "liger", "auto: liger-kernel on a GPU"
        return "chunked", f"auto: liger-kernel is not used with model.logit_softcap={softcap:g}, chunked instead"
    if vocab_size >= 4 * d_model:
        return "chunked", f"auto: vocab {vocab_size} >= 4 x d_model {d_model}"
    return "plain", f"auto: vocab {vocab_size} < 4 x d_model {d_model} (chunking gains nothing)"


def _compute_dtype(h: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast would run lm_head in (None outside autocast)."""
    dev = h.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, impl: str = "chunked",
                         reduction: str = "mean", chunk_rows: int | None = None, softcap: float = 0.0) -> torch.Tensor:
    """CE of (hidden @ weight.T) against labels (-100 not counted), never holding all logits in fp32.

    hidden (..., D), labels (...); reduction mean | sum | none (none -> labels' shape, 0 where ignored).
    Under autocast the matmuls take autocast's dtype, as lm_head would, and accumulate in fp32.
    chunk_rows: rows per chunk (None: default_chunk_rows). softcap > 0: the CE of soft_cap(logits, softcap)."""
    if impl not in ("plain", "chunked", "liger"):
        raise ValueError(f"loss impl must be plain, chunked or liger (resolve train.loss_impl first), got {impl!r}")
    if softcap and impl == "liger":  # resolve_loss_impl never picks liger with a soft-cap
        impl = "chunked"
    h, y = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    dt = _compute_dtype(h)
    with torch.autocast(h.device.type, enabled=False):
        if impl == "liger" and reduction != "none":
            loss = _liger_loss_cls()(ignore_index=-100, reduction=reduction)(weight.to(dt or weight.dtype),
                                                                             h.to(dt or h.dtype), y)
            loss = (loss[0] if isinstance(loss, tuple) else loss).float()  # (loss, z_loss) in some versions
        elif impl in ("chunked", "liger") and dt is None and h.dtype in (torch.float32, torch.float64) and not softcap:
            opts = torch.nn.LinearCrossEntropyOptions(
                batch_chunk_size=chunk_rows or default_chunk_rows(h.shape[0], weight.shape[0]))
            loss = F.linear_cross_entropy(h, weight.to(h.dtype), y, reduction=reduction, ignore_index=-100,
                                          options=opts)
        elif impl in ("chunked", "liger") and reduction != "none":
            loss = chunked_linear_ce(h, weight, y, dt or h.dtype, reduction, chunk_rows, softcap)
        elif impl in ("chunked", "liger"):
            loss = _checkpointed_chunks(h, weight, y, dt or h.dtype, reduction, chunk_rows, softcap)
        else:
            logits = _upcast(F.linear(h.to(dt or h.dtype), weight.to(dt or weight.dtype)))
            loss = F.cross_entropy(soft_cap(logits, softcap) if softcap else logits, y,
                                   ignore_index=-100, reduction=reduction)
    return loss.view(labels.shape) if reduction == "none" else loss


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    """Logits for the CE: at least fp32 (float64 stays float64)."""
    return logits if logits.dtype == torch.float64 else logits.float()


def _chunk_nll(h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, dtype: torch.dtype,
               softcap: float = 0.0) -> torch.Tensor:
    # the casts are inside the chunk, so the weight's gradient is summed over chunks in its own (fp32) dtype
    logits = _upcast(F.linear(h.to(dtype), weight.to(dtype)))
    return F.cross_entropy(soft_cap(logits, softcap) if softcap else logits, y, ignore_index=-100, reduction="none")


CHUNK_LOGITS = 1 << 22  # logits per chunk (16 MiB in fp32): 512 rows of a 6400-token vocabulary
MIN_CHUNK_ROWS = 128  # but at least this many rows: 128 of a 50K vocabulary (32 MiB), as fast as bigger chunks


def default_chunk_rows(rows: int, vocab: int) -> int:
    """A power of two with about CHUNK_LOGITS logits per chunk, at least MIN_CHUNK_ROWS. Measured on a CPU
    (one thread, d_model 128): a 50K vocabulary in chunks of 64 rows is ~15% slower than 128, and 6400 tokens in
    512 rows as fast as 1024 with ~10 MiB less memory. (torch's own 'aspect_ratio' heuristic makes a chunk's
    logits as small as the hidden states: 8 rows for d_model 384 and a 50K vocab, 4x slower on a CPU.)"""
    return min(rows, max(MIN_CHUNK_ROWS, 1 << max(0, (CHUNK_LOGITS // vocab).bit_length() - 1)))


class _ChunkedLinearCE(torch.autograd.Function):
    """sum over rows of scale * CE(z) with z = h @ weight.T (soft-capped: c * tanh(z / c) when softcap = c > 0):
    one chunk of logits at a time, each chunk's gradients computed in forward and kept (h's (N, D) and
    weight's (V, D) in fp32), scaled by grad_output in backward."""

    @staticmethod
    def forward(ctx, h, weight, y, dtype, rows, scale, softcap=0.0):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        w = weight.to(dtype)
        gh = torch.empty(h.shape, dtype=h.dtype, device=h.device) if need_h else None
        gw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        total = torch.zeros((), dtype=acc, device=h.device)
        for s in range(0, h.shape[0], rows):
            hc, yc = h[s:s + rows].to(dtype), y[s:s + rows]
            logits = (hc @ w.T).to(acc)
            if softcap:
                capped = torch.tanh(logits / softcap)  # d(c * tanh(z / c)) / dz = 1 - tanh^2
                logits = capped * softcap
            valid = yc != -100
            tgt = yc.clamp(min=0)
            lse = torch.logsumexp(logits, dim=-1)
            total += ((lse - logits.gather(1, tgt[:, None]).squeeze(1)) * valid).sum()
            if need_h or need_w:  # d CE / d logits = softmax - onehot, zero on ignored rows
                grad = logits.sub_(lse[:, None]).exp_()
                grad[torch.arange(len(tgt), device=grad.device), tgt] -= 1
                if softcap:
                    grad.mul_(1 - capped.square_())
                # `scale` (1/tokens for the mean) is applied after the matmuls, in fp32: an fp16 gradient
                # scaled down by 1/tokens before them would underflow (no loss scale has reached it yet)
                grad = grad.mul_(valid[:, None].to(acc))
                low = grad.to(dtype)  # the same tensor when dtype is the accumulator's
                if need_h:
                    gh[s:s + rows] = (low @ w).to(acc) * scale
                if need_w:  # on a CPU from the fp32 gradient: a low-precision matmul with a transposed operand
                    # is emulated there, and a copy of the chunk back to fp32 would add a chunk's memory
                    gw += ((grad.T @ hc.to(acc)) if h.device.type == "cpu" else (low.T @ hc).to(acc)) * scale
                del low, grad
            del logits  # before the next chunk's are made
        ctx.save_for_backward(gh, gw)
        ctx.weight_dtype = weight.dtype
        return total * scale

    @staticmethod
    def backward(ctx, g):
        gh, gw = ctx.saved_tensors
        return (None if gh is None else gh * g.to(gh.dtype),
                None if gw is None else (gw * g).to(ctx.weight_dtype), None, None, None, None, None)


def chunked_linear_ce(h, weight, y, dtype, reduction="mean", chunk_rows=None, softcap=0.0) -> torch.Tensor:
    """Mean or sum CE of (h.to(dtype) @ weight.to(dtype).T) against y (-100 ignored), fp32 (fp64) result;
    softcap > 0: of the soft-capped logits."""
    r = chunk_rows or default_chunk_rows(h.shape[0], weight.shape[0])
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    # a tensor, not .item(): no host-device sync (0 counted tokens give nan, as F.cross_entropy's mean)
    scale = (1.0 / (y != -100).sum().to(acc)) if reduction == "mean" else torch.ones((), dtype=acc, device=h.device)
    return _ChunkedLinearCE.apply(h, weight, y, dtype, r, scale, float(softcap))


def _checkpointed_chunks(h, weight, y, dtype, reduction, chunk_rows, softcap=0.0):
    r = chunk_rows or default_chunk_rows(h.shape[0], weight.shape[0])
    nll = torch.cat([checkpoint(_chunk_nll, h[s:s + r], weight, y[s:s + r], dtype, softcap, use_reentrant=False)
                     for s in range(0, h.shape[0], r)])
    if reduction == "none":
        return nll
    if reduction == "sum":
        return nll.sum()
    return nll.sum() / (y != -100).sum()


def head_loss(impl: str, labels: torch.Tensor, reduction: str = "mean", chunk_rows: int | None = None):
    """The `head` argument of GPT.forward: (hidden after the final norm, lm_head.weight) -> the loss."""
    return functools.partial(linear_cross_entropy, labels=labels, impl=impl, reduction=reduction,
                             chunk_rows=chunk_rows)


MODEL_KEYS = ("attn_mask", "positions", "doc_ids")  # what GPT.forward takes from a batch besides input_ids


def model_inputs(batch: dict) -> dict:
    """The batch's keyword arguments of GPT.forward (the ones present)."""
    return {k: batch[k] for k in MODEL_KEYS if batch.get(k) is not None}


def token_loss(model, batch: dict, impl: str = "plain", reduction: str = "mean",
               chunk_rows: int | None = None) -> torch.Tensor:
    """The model's CE on a batch (input_ids, labels, optional positions / doc_ids / attn_mask)."""
    kw = model_inputs(batch)
    labels = batch["labels"]
    if impl == "plain":
        logits = model(batch["input_ids"], **kw)
        nll = F.cross_entropy(_upcast(logits).reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100,
                              reduction=reduction)
        return nll.view(labels.shape) if reduction == "none" else nll
    return model(batch["input_ids"], head=head_loss(impl, labels, reduction, chunk_rows), **kw)
