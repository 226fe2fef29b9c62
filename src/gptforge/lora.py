"""LoRA (Hu et al. 2021): low-rank adapters on the projections of a frozen base model, applied from outside the
model (gptforge.model stays plain PyTorch), as parallelism is. Used by the sft and dpo stages (lora.rank > 0),
by the loaders of LoRA checkpoints (merged at load: gptforge.hf.init_from) and by export-hf.

    y = base(x) + (alpha / rank) * B(A(dropout(x)))       A: (rank, in), B: (out, rank) zero-initialised

The library: peft (Hugging Face's maintained LoRA), not a module of our own. peft's `inject_adapter_in_model`
works on our plain GPT (any nn.Linear named in target_modules) and follows our data parallelism: it replaces each
targeted nn.Linear in place by a LoRA layer (`base_layer` + `lora_A` / `lora_B`), plain modules that DDP wraps and
FSDP2's fully_shard shards per block with the rest (frozen base and trainable adapters in one FSDP group, which
FSDP2 allows). It does not follow our tensor parallelism: our TP plan (gptforge.parallel.tp) shards nn.Linear
modules by name and peft has no DTensor LoRA layers, so lora.rank > 0 with parallel.tp > 1 is refused.
peft is imported only when LoRA is used (pip install peft)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from gptforge.errors import UserError

if TYPE_CHECKING:  # imported where used: loading a checkpoint need not import the config system (tyro)
    from gptforge.config.schema import LoRASection

LORA_FILE = "lora.json"  # in a LoRA checkpoint: the settings and the base (path and sha256)
ADAPTER = "default"  # peft's adapter name: one adapter per model


def require_peft():
    try:
        import peft
    except ImportError:
        raise UserError("LoRA (lora.rank > 0, or a LoRA checkpoint) needs the peft library; "
                        "pip install peft (or pip install 'gptforge[lora]')") from None
    return peft


def apply_lora(model: nn.Module, lc: LoRASection) -> nn.Module:
    """Freeze every parameter of `model` (plain, unwrapped) and add adapters to the projections lora.targets
    names (those this model has: gate_proj only with a SwiGLU MLP); in place, -> model. A is drawn from
    torch's global RNG (the same seed on every rank gives the same adapters), B is zero: output unchanged."""
    from gptforge.config.schema import lora_target_names

    peft = require_peft()
    present = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
                     & set(lora_target_names(lc.targets)))
    if not present:
        raise UserError(f"lora.targets={lc.targets} names no projection of this model; use e.g. attn,mlp")
    model.requires_grad_(False)
    conf = peft.LoraConfig(r=lc.rank, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=present,
                           bias="none")
    peft.inject_adapter_in_model(conf, model, adapter_name=ADAPTER)
    for _, layer in lora_layers(model):  # only the adapters train
        for p in (*layer.lora_A[ADAPTER].parameters(), *layer.lora_B[ADAPTER].parameters()):
            p.requires_grad_(True)
    return model


def lora_layers(model: nn.Module):
    """(name, peft LoRA layer) of every adapted projection."""
    if not has_lora(model):  # peft is imported only for a model with adapters
        return []
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def has_lora(model: nn.Module) -> bool:
    return any(".lora_A." in n for n, _ in model.named_parameters())


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Forwards inside run the base alone (DPO's reference: no second copy of the model). peft's own switch,
    enable_adapters(False), also flips requires_grad, which DDP and FSDP2 must not see change during a run:
    this sets only the flag its forward reads (BaseTunerLayer.disable_adapters)."""
    layers = [m for _, m in lora_layers(model)]
    was = [m._disable_adapters for m in layers]
    try:
        for m in layers:
            m._disable_adapters = True
        yield model
    finally:
        for m, w in zip(layers, was):
            m._disable_adapters = w


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """W += (alpha / rank) B A in every adapted projection, which becomes a plain nn.Linear again; every
    parameter trainable again (a plain model). In place, -> model."""
    for name, layer in lora_layers(model):
        layer.merge(adapter_names=[ADAPTER])
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer.get_base_layer())
    return model.requires_grad_(True)


def adapter_tensors(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Our module name (e.g. layers.0.attn.q_proj) -> (A (rank, in), B (out, rank), scaling alpha / rank)."""
    return {n: (m.lora_A[ADAPTER].weight.detach(), m.lora_B[ADAPTER].weight.detach(), float(m.scaling[ADAPTER]))
            for n, m in lora_layers(model)}


def lora_record(lc: LoRASection, base: dict) -> dict:
    """lora.json: the settings and the base model (path, sha256 of its weight files)."""
    return {"rank": lc.rank, "alpha": lc.alpha, "dropout": lc.dropout, "targets": lc.targets, "base": base}


def read_lora_record(ckpt: Path) -> dict | None:
    """A checkpoint's lora.json (None: not a LoRA checkpoint); UserError if it is malformed."""
    from gptforge.config.schema import LoRASection

    f = Path(ckpt) / LORA_FILE
    if not f.is_file():
        return None
    try:
        rec = json.loads(f.read_text())
        LoRASection(**{k: rec[k] for k in ("rank", "alpha", "dropout", "targets")}).check()
        if rec["rank"] < 1 or not isinstance(rec["base"].get("path"), str):
            raise ValueError("rank < 1 or no base path")
    except (ValueError, KeyError, TypeError, AttributeError, UserError) as e:
        raise UserError(f"checkpoint '{ckpt}' has an invalid {LORA_FILE} ({str(e).splitlines()[0]}); the file "
                        "was altered or is not from gptforge") from None
    return rec


def record_settings(rec: dict) -> LoRASection:
    from gptforge.config.schema import LoRASection

    return LoRASection(rank=rec["rank"], alpha=rec["alpha"], dropout=rec["dropout"], targets=rec["targets"])
