"""The optimizers and LR schedules: AdamW (weight decay on matrices only, fused on CUDA/ROCm and CPU), or Muon for
the blocks' weight matrices with AdamW for the rest (train.optimizer=muon: MuonAdamW); a step's update skipped on
the device when it is not finite (skip_on_device)."""

from __future__ import annotations

import contextlib
import math
import re

import torch

from gptforge.parallel.mesh import is_dtensor

_WRAPPERS = re.compile(r"(^|\.)(module|_checkpoint_wrapped_module|_orig_mod)\.")  # DDP, checkpointing, compile


def build_optimizer(model: torch.nn.Module, tcfg, device: torch.device, precision: str | None = None
                    ) -> torch.optim.Optimizer:
    """train.optimizer=adamw: AdamW over every parameter; muon: MuonAdamW (muon_roles says which parameter gets
    which). `precision` (the run's resolved train.precision) picks Muon's Newton-Schulz dtype on a CPU."""
    if tcfg.optimizer == "muon":
        return MuonAdamW(model, tcfg, device, precision)
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": tcfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=tcfg.lr, betas=(tcfg.beta1, tcfg.beta2), eps=1e-8, **_fused(device))


def _fused(device: torch.device) -> dict:
    if device.type in ("cuda", "cpu"):  # one kernel for all parameters; on the 2-core CPU ~10x foreach (nano)
        return {"fused": True}
    return {}


def peak_lrs(optimizer: torch.optim.Optimizer, tcfg) -> list[float]:
    """Each param group's peak learning rate, the one the LR schedule scales (lr_at(..., peak=...)): MuonAdamW's
    own per group (muon_lr, embed_lr, ...), train.lr for every group of plain AdamW."""
    return list(getattr(optimizer, "peak_lrs", None) or [tcfg.lr] * len(optimizer.param_groups))


def lr_at(step: int, total: int, tcfg, peak: float | None = None) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total`: linear warmup, then cosine to
    min_lr, WSD (constant, then linear decay over the last decay_fraction), or constant. `peak`: the
    schedule of a param group whose peak is not train.lr (the same shape, scaled)."""
    peak = tcfg.lr if peak is None else peak
    floor = peak * tcfg.min_lr_ratio
    warm = min(tcfg.warmup_steps, max(total - 1, 0))
    if step < warm:
        return peak * (step + 1) / warm
    if tcfg.schedule == "constant":
        return peak
    if tcfg.schedule == "wsd":
        decay_start = int(total * (1 - tcfg.decay_fraction))
        if step < decay_start:
            return peak
        frac = (step - decay_start) / max(1, total - decay_start)
        return peak + (floor - peak) * min(frac, 1.0)
    frac = (step - warm) / max(1, total - warm)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * min(frac, 1.0)))


def skip_on_device(optimizer: torch.optim.Optimizer, finite: torch.Tensor) -> None:
    """optimizer.step() unless `finite` (a bool tensor on the device) is False, decided on the device: fused
    AdamW honours ``found_inf`` as GradScaler sets it (parameters, moments and step count left unchanged), so
    the host does not wait; so does MuonAdamW over a fused AdamW. Another optimizer reads the flag first."""
    if not (optimizer.defaults.get("fused") or getattr(optimizer, "honours_found_inf", False)):
        if bool(finite):
            optimizer.step()
        return
    optimizer.found_inf, optimizer.grad_scale = (~finite).float(), None
    try:
        with _implicit_replication(optimizer):  # the plain flag beside DTensor parameters (FSDP2, TP)
            optimizer.step()
    finally:
        optimizer.found_inf = None


# ---- Muon (train.optimizer=muon) ------------------------------------------------------------------------------
def _plain_name(name: str) -> str:
    """A parameter's name as the plain GPT names it: no DDP "module.", activation checkpointing's
    "_checkpoint_wrapped_module." or torch.compile's "_orig_mod." (FSDP2 and TP keep names as they are)."""
    while (plain := _WRAPPERS.sub(r"\1", name)) != name:
        name = plain
    return name


def muon_roles(model: torch.nn.Module) -> dict[str, str]:
    """train.optimizer=muon: which optimizer and learning rate each trainable parameter gets, by name ->
    "muon" (the 2-D weight matrices inside the blocks: q/k/v/o and the MLP's; Muon at train.muon_lr),
    "embed" (tok_emb, pos_emb; AdamW at train.embed_lr), "head" (lm_head when untied; AdamW at train.head_lr;
    a tied head is tok_emb itself, named once) or "scalar" (norm gains, biases, any other parameter; AdamW at
    train.scalar_lr, no weight decay)."""
    roles = {}
    for name, p in model.named_parameters():  # each shared (tied) parameter once, under its first name
        if not p.requires_grad:
            continue
        plain = _plain_name(name)
        if plain.startswith(("tok_emb.", "pos_emb.")):
            roles[plain] = "embed"
        elif plain.startswith("lm_head."):
            roles[plain] = "head"
        elif plain.startswith("layers.") and p.dim() == 2:
            roles[plain] = "muon"
        else:
            roles[plain] = "scalar"
    return roles


def newton_schulz(g: torch.Tensor, steps: int, coefficients: tuple[float, float, float], eps: float,
                  dtype: torch.dtype) -> torch.Tensor:
    """The orthogonalisation of torch.optim.Muon (Keller Jordan's quintic iteration, ~U V^T of g's SVD, singular
    values near 1) in `dtype`: scale to spectral norm <= 1, then X <- a X + (b A + c A^2) X with A = X X^T, on the
    wide orientation (the Gram matrix is the smaller side). The same operations as torch's, whose dtype is bf16."""
    a, b, c = coefficients
    x = g.to(dtype)
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.addmm(x, poly, x, beta=a)
    return x.T if tall else x


def adjusted_lr(lr: float, adjust_lr_fn: str | None, shape) -> float:
    """torch.optim.Muon's per-matrix scale of the lr (shape = (out, in) of the whole matrix): "original" (Keller
    Jordan's) sqrt(max(1, out / in)); "match_rms_adamw" (Moonshot's) 0.2 sqrt(max(out, in)), an update RMS like
    AdamW's, so AdamW's lr and weight decay carry over."""
    rows, cols = shape[0], shape[1]
    if adjust_lr_fn in (None, "original"):
        return lr * math.sqrt(max(1.0, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    raise ValueError(f"unknown adjust_lr_fn {adjust_lr_fn!r}")


def _implicit_replication(optimizer: torch.optim.Optimizer):
    """DTensor's implicit_replication where the optimizer holds DTensor parameters (FSDP2, TP), else nothing to
    do (its module imports context parallel and FlexAttention: not for a plain run)."""
    if not any(is_dtensor(p) for g in optimizer.param_groups for p in g["params"]):
        return contextlib.nullcontext()
    from torch.distributed.tensor.experimental import implicit_replication
    return implicit_replication()


def _local(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor laid out like `like` (itself when plain); in-place changes reach the DTensor."""
    if is_dtensor(t):
        if t.placements != like.placements:
            t = t.redistribute(like.device_mesh, like.placements)
        return t.to_local()
    return t


class Muon(torch.optim.Muon):
    """torch.optim.Muon (its hyperparameters, their checks, its param groups and state: one "momentum_buffer" per
    matrix, so a checkpoint has torch's layout) with a step() of our own, for three things torch's lacks:

    1. Sharded matrices (FSDP2's Shard(0), TP's colwise Shard(0) and rowwise Shard(1), HSDP, FSDP2 x TP). Muon
       orthogonalises the WHOLE matrix; Newton-Schulz on a shard is another update. The momentum buffer is kept
       sharded like the parameter (momentum, Nesterov and weight decay are elementwise: each rank updates its own
       shard); the Nesterov update is all-gathered to the full matrix (DTensor.full_tensor()), every rank
       orthogonalises it (the same input gives the same result) and takes its own shard of the result back by
       slicing (distribute_tensor(..., src_data_rank=None): no communication). Cost per step: one all-gather of
       each matrix (the size of FSDP2's own parameter all-gather) and Newton-Schulz repeated on every rank.
       torch's step would run the iteration on the DTensor itself: each matmul a redistribution, on a DTensor it
       does not support in general.
    2. The Newton-Schulz dtype (`ns_dtype`): torch's is always bf16, which a CPU without fast bf16 matmuls runs
       several times slower than fp32; a float64 matrix is orthogonalised in float64 (the tests' reference).
    3. found_inf (skip_on_device): a non-finite step leaves parameters and momentum unchanged, decided on the
       device (torch.where), as fused AdamW does, so the host does not wait for the flag."""

    def __init__(self, params, ns_dtype: torch.dtype = torch.bfloat16, **kw):
        super().__init__(params, **kw)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None, found_inf: torch.Tensor | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        keep = None if found_inf is None else found_inf.to(torch.bool)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                self._update(p, p.grad, state["momentum_buffer"], group, keep)
        return loss

    def _update(self, p, grad, buf, group, keep) -> None:
        """torch.optim.Muon's update of one matrix, on this rank's shard, Newton-Schulz on the whole matrix."""
        lr, mu = group["lr"], group["momentum"]
        param, g, m = _local(p, p), _local(grad, p), _local(buf, p)
        new_m = m.lerp(g, 1 - mu)
        update = g.lerp(new_m, mu) if group["nesterov"] else new_m
        if is_dtensor(p):
            from torch.distributed.tensor import DTensor, distribute_tensor  # imported already (is_dtensor)
            update = DTensor.from_local(update, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                        stride=p.stride()).full_tensor()
        dtype = torch.float64 if update.dtype == torch.float64 else self.ns_dtype
        ortho = newton_schulz(update, group["ns_steps"], group["ns_coefficients"], group["eps"], dtype)
        if is_dtensor(p):
            ortho = distribute_tensor(ortho, p.device_mesh, p.placements, src_data_rank=None).to_local()
            assert ortho.shape == param.shape, f"shard of the update {tuple(ortho.shape)} != {tuple(param.shape)}"
        new_p = param.mul(1 - lr * group["weight_decay"]).add_(ortho, alpha=-adjusted_lr(lr, group["adjust_lr_fn"],
                                                                                            p.shape))
        if keep is not None:  # found_inf set: the old values where the step is not finite
            new_m, new_p = torch.where(keep, m, new_m), torch.where(keep, param, new_p)
        m.copy_(new_m)
        param.copy_(new_p)


class MuonAdamW(torch.optim.Optimizer):
    """train.optimizer=muon as ONE optimizer to the rest of gptforge (the trainer's param_groups and step, DCP's
    get_state_dict / set_state_dict, rollback, skip_on_device): an inner Muon over the blocks' matrices and an inner
    torch AdamW (fused where plain AdamW is) over the rest (muon_roles), sharing this optimizer's param groups
    (Muon's group first, then AdamW's: embed, head, scalar, those present) and its state (one dict keyed by
    parameter), so state_dict() and load_state_dict() are torch's own over all of them."""

    def __init__(self, model: torch.nn.Module, tcfg, device: torch.device, precision: str | None = None):
        roles = muon_roles(model)
        named = {_plain_name(n): p for n, p in model.named_parameters() if p.requires_grad}
        params = {r: [named[n] for n, role in roles.items() if role == r] for r in ("muon", "embed", "head", "scalar")}
        if not params["muon"]:
            raise ValueError("train.optimizer=muon: the model has no 2-D weight matrices in its blocks")
        peak = {"embed": tcfg.embed_lr, "head": tcfg.head_lr, "scalar": tcfg.scalar_lr}
        adamw_groups = [{"params": params[r], "lr": peak[r] or tcfg.lr,
                         "weight_decay": 0.0 if r == "scalar" else tcfg.weight_decay}
                        for r in ("embed", "head", "scalar") if params[r]]
        # Newton-Schulz in bf16 as torch's on a GPU. On a CPU in the run's precision: bf16 matmuls are ~4x faster
        # than fp32 on a CPU with fast bf16 (AMD EPYC, AVX512-BF16: 12 vs 48 ms for a 1536x384 matrix, 1 thread)
        # but slower on one without (Intel without AMX), and the run's precision is our one word on which this
        # CPU is; an fp32 run (the exactness tests, a CPU where bf16 is slow) keeps fp32.
        ns_dtype = torch.float32 if device.type == "cpu" and precision != "bf16" else torch.bfloat16
        self.muon = Muon([{"params": params["muon"]}], ns_dtype=ns_dtype, lr=tcfg.muon_lr,
                         momentum=tcfg.muon_momentum, weight_decay=tcfg.muon_weight_decay, nesterov=True,
                         ns_steps=tcfg.muon_ns_steps, adjust_lr_fn=tcfg.muon_adjust_lr)
        self.adamw = torch.optim.AdamW(adamw_groups, lr=tcfg.lr, betas=(tcfg.beta1, tcfg.beta2), eps=1e-8,
                                       **_fused(device))
        super().__init__(self.muon.param_groups + self.adamw.param_groups, {})
        self.roles = ["muon"] + [r for r in ("embed", "head", "scalar") if params[r]]
        self.peak_lrs = [g["lr"] for g in self.param_groups]
        # the config's hyperparameters: a resume restores state from the checkpoint, settings from the config
        self._settings = [{k: v for k, v in g.items() if k not in ("params", "lr")} for g in self.param_groups]
        self._link()

    @property
    def honours_found_inf(self) -> bool:
        """skip_on_device may set found_inf and step on the device: true when the inner AdamW is fused."""
        return bool(self.adamw.defaults.get("fused"))

    def _link(self) -> None:
        """The inner optimizers use this one's param groups and state (after __init__ and load_state_dict)."""
        n = len(self.muon.param_groups)
        self.muon.__setstate__({"state": self.state, "param_groups": self.param_groups[:n]})
        self.adamw.__setstate__({"state": self.state, "param_groups": self.param_groups[n:]})

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        for group, settings in zip(self.param_groups, self._settings):
            group.update(settings)
        self._link()

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        found_inf = getattr(self, "found_inf", None)
        self.adamw.found_inf, self.adamw.grad_scale = found_inf, getattr(self, "grad_scale", None)
        try:
            self.adamw.step()
        finally:
            self.adamw.found_inf = self.adamw.grad_scale = None
        self.muon.step(found_inf=found_inf)
        return loss
