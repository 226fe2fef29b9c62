"""Document masking for packed rows: a token attends to earlier tokens of its own document only.

The batch carries document ids (B, T) (data/sft.collate_packed; the padding tail is one more document),
not a (B, 1, T, T) mask. The model turns them, once per forward, into
  flex: a FlexAttention BlockMask (mask_mod = causal & same document): fully masked blocks are skipped
        and no (T, T) mask exists; on CUDA/ROCm flex_attention runs compiled (a fused kernel).
  sdpa: the dense bool mask for scaled_dot_product_attention (the reference path; the CPU's: torch's
        FlexAttention has no backward on CPU, and its CPU forward runs unfused).
GPT.attention (auto | sdpa | flex, set from train.attention) picks one; auto = flex on a GPU, else sdpa."""

from __future__ import annotations

import functools

import torch

from gptforge.errors import UserError

ATTENTION_IMPLS = ("auto", "sdpa", "flex")


def resolve_attention(setting: str, device: torch.device, dropout: float = 0.0) -> str:
    """-> sdpa | flex for training on `device`. flex has no attention dropout: dropout > 0 keeps sdpa."""
    if setting not in ATTENTION_IMPLS:
        raise UserError(f"train.attention must be one of {', '.join(ATTENTION_IMPLS)}, got {setting!r}")
    gpu = torch.device(device).type == "cuda"  # ROCm builds report "cuda" too
    if setting == "flex" and not gpu:
        raise UserError(f"train.attention=flex needs a CUDA/ROCm device (FlexAttention has no backward on "
                        f"{torch.device(device).type}); use train.attention=auto or sdpa")
    if dropout > 0 or setting == "sdpa":
        return "sdpa"
    return "flex" if gpu else "sdpa"


def dense_document_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) document ids -> bool (B, 1, T, T): causal and same document."""
    T = doc_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    return ((doc_ids[:, :, None] == doc_ids[:, None, :]) & causal)[:, None]


def block_document_mask(doc_ids: torch.Tensor):
    """(B, T) document ids -> a FlexAttention BlockMask (causal and same document)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def same_doc_causal(b, h, q, kv):
        return (q >= kv) & (doc_ids[b, q] == doc_ids[b, kv])

    B, T = doc_ids.shape
    # compiled on a GPU: the mask is built block by block, never as a (B, T, T) tensor
    return create_block_mask(same_doc_causal, B, None, T, T, device=doc_ids.device,
                             _compile=doc_ids.device.type == "cuda")


def is_block_mask(mask) -> bool:
    return mask is not None and not torch.is_tensor(mask)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask) -> torch.Tensor:
    """FlexAttention (grouped-query k/v as they are), compiled on CUDA/ROCm (fused kernel), eager elsewhere
    (unfused reference); inside a compiled block it is traced into the block's graph."""
    from torch.nn.attention.flex_attention import flex_attention as eager

    gqa = q.shape[1] != k.shape[1]
    if q.device.type == "cuda" and not torch.compiler.is_compiling():
        return _compiled_flex()(q, k, v, block_mask=block_mask, enable_gqa=gqa)
    return eager(q, k, v, block_mask=block_mask, enable_gqa=gqa)


def document_mask(doc_ids: torch.Tensor, attention: str):
    """The mask the attention layers get: a BlockMask (flex) or a dense bool mask (sdpa)."""
    return block_document_mask(doc_ids) if attention == "flex" else dense_document_mask(doc_ids)
