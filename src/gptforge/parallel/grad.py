"""Gradient clipping that works for plain tensors, DDP, FSDP2 and TP (DTensors on different meshes).

torch.nn.utils.clip_grad_norm_ stacks the per-parameter norms, which fails when a model mixes plain
tensors with DTensors, or DTensors on different meshes (FSDP2 on a TP model shards the TP weights on
the 2-D (dp, tp) mesh and everything else on the dp mesh). Here the grads are grouped by
(mesh, placements); each group's norm is reduced with one collective (DTensor.full_tensor), and the
groups are combined locally — as torchtitan does for pipeline stages."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from gptforge.parallel.mesh import is_dtensor


def _group_key(g: torch.Tensor):
    if is_dtensor(g):
        return ("dtensor", id(g.device_mesh), tuple(g.placements))
    return ("plain", g.device, g.dtype)


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
    """Clip in place; returns the total gradient norm over all parameters as a plain tensor."""
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return torch.zeros(())
    groups: dict[tuple, list[torch.Tensor]] = {}
    for p in params:
        groups.setdefault(_group_key(p.grad), []).append(p)
    norms = []
    for ps in groups.values():
        n = torch.nn.utils.get_total_norm([p.grad for p in ps], norm_type)
        if is_dtensor(n):
            n = n.full_tensor()
        norms.append(n.float())
    device = norms[0].device
    norms = [n.to(device) for n in norms]
    if math.isinf(norm_type):
        total = torch.stack(norms).max()
    else:
        total = torch.stack(norms).pow(norm_type).sum().pow(1.0 / norm_type)
    if math.isfinite(max_norm):
        for ps in groups.values():
            torch.nn.utils.clip_grads_with_norm_(ps, max_norm, total.to(ps[0].grad.device))
    return total
