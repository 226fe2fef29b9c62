"""Tensor parallel plan for gptforge's GPT (both styles), applied from outside the model.

Per block (Megatron style):
  attention: q/k/v ColwiseParallel (each rank holds n_head/tp query heads and n_kv_head/tp kv heads;
             the model reshapes with -1 heads), o_proj RowwiseParallel
  MLP:       up/gate ColwiseParallel, down RowwiseParallel
  qk_norm:   q_norm/k_norm (one gain per head_dim, shared by all heads) replicated, their input taken as
             sharded along the heads (dim 2 of (B, T, heads, head_dim)): each rank's gain gradient covers
             only its own heads, so it must be summed over the ranks, which DTensor does (a plain replicated
             parameter would silently keep a different gradient per rank)
Embeddings, the final norm and lm_head stay replicated (they are tied by default, and the vocabulary of
small models does not pay for a sharded loss).

With sequence_parallel=True the residual stream between blocks is sharded along the sequence (dim 1):
the norms run as SequenceParallel on 1/tp of the tokens, attention/MLP inputs are all-gathered once per
sub-block, o_proj/down_proj reduce-scatter instead of all-reduce. The stream is sharded at the first
block's input and gathered again before lm_head, so the embedding/lm_head code is untouched.
"""

from __future__ import annotations

import torch.nn as nn
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from gptforge.errors import UserError


def check_tp(cfg, tp: int, sequence_parallel: bool = False) -> None:
    """Clear errors for shapes that cannot be split `tp` ways."""
    problems = []
    if cfg.n_head % tp:
        problems.append(f"model.n_head={cfg.n_head}")
    if cfg.kv_heads % tp:
        problems.append(f"model.n_kv_head={cfg.kv_heads} (grouped-query attention: every rank needs whole kv heads)")
    if cfg.d_ff % tp:
        problems.append(f"model.d_ff={cfg.d_ff}")
    if sequence_parallel and cfg.block_size % tp:
        problems.append(f"model.block_size={cfg.block_size} (sequence parallel splits the context)")
    if problems:
        raise UserError(f"parallel.tp={tp} does not divide {', '.join(problems)}; "
                        f"choose a tp that divides them (or parallel.tp=1)")


def _shard_seq_hook(mesh):
    """Forward pre-hook: replicated (B, T, D) -> this rank's (B, T/tp, D) slice (grads all-gathered back)."""

    def hook(_module, args):
        x = args[0]
        if isinstance(x, DTensor):
            x = x.redistribute(mesh, [Shard(1)]).to_local()
        else:
            x = DTensor.from_local(x, mesh, [Replicate()], run_check=False).redistribute(mesh, [Shard(1)]).to_local()
        return (x, *args[1:])

    return hook


def _gather_seq_hook(mesh):
    """Forward pre-hook: sequence-sharded input (local slice or Shard(1) DTensor) -> full local tensor."""

    def hook(_module, args):
        x = args[0]
        if not isinstance(x, DTensor):
            x = DTensor.from_local(x, mesh, [Shard(1)], run_check=False)
        return (x.redistribute(mesh, [Replicate()]).to_local(), *args[1:])

    return hook


def apply_tp(model: nn.Module, tp_mesh, sequence_parallel: bool = False) -> nn.Module:
    """Parallelize `model` (a gptforge GPT) in place over the 1-D `tp_mesh`."""
    tp = tp_mesh.size()
    check_tp(model.cfg, tp, sequence_parallel)
    sp = sequence_parallel
    row_out = Shard(1) if sp else Replicate()
    for block in model.layers.values():
        plan = {
            "attn.q_proj": ColwiseParallel(),
            "attn.k_proj": ColwiseParallel(),
            "attn.v_proj": ColwiseParallel(),
            "attn.o_proj": RowwiseParallel(output_layouts=row_out),
            "mlp.up_proj": ColwiseParallel(),
            "mlp.down_proj": RowwiseParallel(output_layouts=row_out),
        }
        if hasattr(block.mlp, "gate_proj"):
            plan["mlp.gate_proj"] = ColwiseParallel()
        if hasattr(block.attn, "q_norm"):
            # SequenceParallel's mechanics (a Replicate gain, an input sharded along a dim) on the head dim
            plan["attn.q_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
            plan["attn.k_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
        if sp:
            plan["attn_norm"] = SequenceParallel()
            plan["mlp_norm"] = SequenceParallel()
        parallelize_module(block, tp_mesh, plan)
        if sp:
            block.attn.register_forward_pre_hook(_gather_seq_hook(tp_mesh))
            block.mlp.register_forward_pre_hook(_gather_seq_hook(tp_mesh))
    if sp:
        first = next(iter(model.layers.values()))
        first.register_forward_pre_hook(_shard_seq_hook(tp_mesh))
        parallelize_module(model.norm, tp_mesh, SequenceParallel())
        model.lm_head.register_forward_pre_hook(_gather_seq_hook(tp_mesh))
    return model
