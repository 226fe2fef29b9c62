"""Local SGD / DiLoCo-style synchronisation for slow links (`--parallel.sync_every=H`).

Each data-parallel replica trains on its own share of the data for H optimizer steps with no gradient
all-reduce at all; then the replicas exchange once: the outer step. With Δ the mean over replicas of
(anchor - params), the change since the last synchronisation, the outer step sets

    params = anchor - outer_lr x u,   u = Δ (outer_momentum 0)  or  Nesterov: m = μ m + Δ, u = Δ + μ m

and the result becomes the next anchor. outer_lr 1 with no momentum is plain parameter averaging (local
SGD); DiLoCo uses outer_lr 0.7, Nesterov 0.9. Communication per optimizer step falls H-fold. Each
replica keeps its own inner optimizer (AdamW) state, which a checkpoint saves per rank. A checkpoint is
taken right after a synchronisation (a save step forces one), so the parameters are the same everywhere
and the anchor is the parameters themselves; the outer momentum is the same on every replica and is
saved once. H = 1 is not this module: it is DDP (gradients all-reduced every step).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from gptforge.errors import UserError


def check_local_sgd(parallel_cfg, strategy: str, tp_size: int) -> None:
    """One line when sync_every > 1 is combined with something it cannot work with."""
    p = parallel_cfg
    if p.sync_every < 1:
        raise UserError(f"parallel.sync_every must be >= 1 (1: every step, DDP), got {p.sync_every}")
    if p.sync_every == 1:
        return
    if strategy not in ("ddp", "none") or tp_size > 1:
        raise UserError(f"parallel.sync_every={p.sync_every} trains whole replicas that synchronise every "
                        f"{p.sync_every} steps, but this run is {strategy}{' + tp' if tp_size > 1 else ''}; use "
                        "--parallel.strategy=ddp (the model must fit one device) or --parallel.sync_every=1")
    if p.grad_compression != "none":
        raise UserError(f"parallel.sync_every={p.sync_every} sends no gradients between synchronisations, so "
                        f"parallel.grad_compression={p.grad_compression} has nothing to compress; use one of the two")
    if not 0 < p.outer_lr <= 2 or not 0 <= p.outer_momentum < 1:
        raise UserError(f"parallel.outer_lr must be in (0, 2] and parallel.outer_momentum in [0, 1), got "
                        f"{p.outer_lr} and {p.outer_momentum}")


class LocalSGD:
    def __init__(self, model: torch.nn.Module, every: int, outer_lr: float = 1.0, outer_momentum: float = 0.0,
                 group=None):
        self.every, self.lr, self.mu, self.group = every, outer_lr, outer_momentum, group
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.anchor = [p.detach().clone() for p in self.params]
        self.momentum = [torch.zeros_like(p) for p in self.params] if outer_momentum else None
        self.syncs = 0

    def due(self, step: int) -> bool:
        return step % self.every == 0

    @torch.no_grad()
    def sync(self) -> None:
        """The outer step: one all-reduce of the flattened change since the last synchronisation."""
        delta = torch.cat([(a - p).flatten() for a, p in zip(self.anchor, self.params)])
        dist.all_reduce(delta, group=self.group)
        delta /= dist.get_world_size(self.group)
        offset = 0
        for i, (a, p) in enumerate(zip(self.anchor, self.params)):
            d = delta[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
            if self.momentum is not None:
                m = self.momentum[i].mul_(self.mu).add_(d)
                d = d + self.mu * m
            a.sub_(d, alpha=self.lr)
            p.copy_(a)
        self.syncs += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint (taken right after sync()) needs: the outer momentum, the same on every rank."""
        return {f"momentum.{i}": m for i, m in enumerate(self.momentum or [])}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """After the model was restored: the anchor is the (synchronised) parameters; momentum as saved."""
        for a, p in zip(self.anchor, self.params):
            a.copy_(p)
        for i, m in enumerate(self.momentum or []):
            m.copy_(state[f"momentum.{i}"])
