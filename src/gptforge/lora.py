"""LoRA (Hu et al. 2021): low-rank adapters on the projections of a frozen base model, applied from outside the
model (gptforge.model stays plain PyTorch), as parallelism is. Used by the sft and dpo stages (lora.rank > 0),
by the loaders of LoRA checkpoints (merged at load: gptforge.hf.init_from) and by export-hf.

    y = base(x) + (alpha / rank) * B(A(dropout(x)))       A: (rank, in), B: (out, rank) zero-initialised

The library: peft (Hugging Face's maintained LoRA), not a module of our own. peft's `inject_adapter_in_model`
works on our plain GPT (any nn.Linear named in target_modules) and follows our data parallelism: it replaces each
targeted nn.Linear in place by a LoRA layer (`base_layer` + `lora_A` / `lora_B`), plain modules that DDP wraps and
FSDP2's fully_shard shards per block with the rest (frozen base and trainable adapters in one FSDP group, which
FSDP2 allows). lora.train_tokens: peft's trainable_token_indices trains chosen rows of the frozen embedding (and
of an untied head; a tied head follows the embedding's rows): a base that never saw the chat template learns its
tokens. It does not follow our tensor parallelism: our TP plan (gptforge.parallel.tp) shards nn.Linear
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
TOKEN_ROWS = "trainable_tokens_delta"  # peft's name of the trained embedding rows (their values, not a difference)


def is_adapter_key(name: str) -> bool:
    """A parameter (state-dict key) a LoRA run trains and checkpoints: an adapter or trained embedding rows."""
    return ".lora_" in name or f".{TOKEN_ROWS}." in name


def require_peft():
    try:
        import peft
    except ImportError:
        raise UserError("LoRA (lora.rank > 0, or a LoRA checkpoint) needs the peft library; "
                        "pip install peft (or pip install 'gptforge[lora]')") from None
    return peft


def apply_lora(model: nn.Module, lc: LoRASection, token_ids: list[int] | tuple = ()) -> nn.Module:
    """Freeze every parameter of `model` (plain, unwrapped) and add adapters to the projections lora.targets
    names (those this model has: gate_proj only with a SwiGLU MLP), and trainable rows `token_ids` of the
    embedding and head (lora.train_tokens); in place, -> model. A is drawn from torch's global RNG (the same seed
    on every rank gives the same adapters), B is zero and the rows start as the base's: output unchanged."""
    from gptforge.config.schema import lora_target_names

    peft = require_peft()
    present = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
                     & set(lora_target_names(lc.targets)))
    if not present:
        raise UserError(f"lora.targets={lc.targets} names no projection of this model; use e.g. attn,mlp")
    tied = model.lm_head.weight is model.tok_emb.weight
    rows = _token_layers(model, list(token_ids), tied)
    if rows and "trainable_token_indices" not in peft.LoraConfig.__dataclass_fields__:
        raise UserError(f"lora.train_tokens needs peft >= 0.15 (this is {peft.__version__}); pip install -U peft, "
                        "or pass --lora.train_tokens=none")
    model.requires_grad_(False)
    conf = peft.LoraConfig(r=lc.rank, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=present,
                           bias="none", trainable_token_indices=rows)
    peft.inject_adapter_in_model(conf, model, adapter_name=ADAPTER)
    if rows and tied:  # peft ties a head only for transformers models: the head reads the embedding's rows
        from peft.utils import TrainableTokensWrapper

        model.lm_head = TrainableTokensWrapper(model.lm_head, ADAPTER, token_indices=rows["tok_emb"],
                                               tied_adapter=model.tok_emb.token_adapter)
        model.lm_head.set_adapter(ADAPTER, inference_mode=False)
    for n, p in model.named_parameters():  # only the adapters (and the chosen rows) train
        p.requires_grad_(is_adapter_key(n))
    return model


def _token_layers(model: nn.Module, ids: list[int], tied: bool) -> dict[str, list[int]] | None:
    """peft's trainable_token_indices: the rows `ids` of the embedding, and of the head when it is untied."""
    if not ids:
        return None
    n = model.tok_emb.weight.shape[0]
    if len(set(ids)) != len(ids) or any(not 0 <= i < n for i in ids):
        raise UserError(f"lora.train_tokens: token ids {ids} are repeated or outside this model's {n} rows; name "
                        "each token once, one the tokenizer has")
    return {"tok_emb": ids} if tied else {"tok_emb": ids, "lm_head": ids}


def lora_layers(model: nn.Module):
    """(name, peft LoRA layer) of every adapted projection."""
    if not has_lora(model):  # peft is imported only for a model with adapters
        return []
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def token_wrappers(model: nn.Module):
    """(name, peft TrainableTokensWrapper) of the embedding and head whose rows lora.train_tokens trains."""
    if not has_lora(model):
        return []
    from peft.utils import TrainableTokensWrapper

    return [(n, m) for n, m in model.named_modules() if isinstance(m, TrainableTokensWrapper)]


def has_lora(model: nn.Module) -> bool:
    return any(".lora_A." in n for n, _ in model.named_parameters())


def train_token_ids(spec: str, tok) -> tuple[list[str], list[int]]:
    """lora.train_tokens -> (token strings, their ids in `tok`): "chat" is ChatML's <|im_start|> and <|im_end|>,
    "none" nothing; else a comma list of tokens, each one token of the tokenizer."""
    from gptforge.data.tokenizer import IM_END, IM_START

    spec = spec.strip()
    names = [] if spec == "none" else [IM_START, IM_END] if spec == "chat" else [s.strip() for s in spec.split(",")]
    ids = [tok.hf.token_to_id(s) for s in names]
    bad = [s for s, i in zip(names, ids) if i is None]
    if bad:
        raise UserError(f"lora.train_tokens: {', '.join(bad)} is not a token of this tokenizer; name whole tokens "
                        "(e.g. <|im_start|>,<|im_end|>), or use chat or none")
    return names, ids


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Forwards inside run the base alone (DPO's reference: no second copy of the model). peft's own switch,
    enable_adapters(False), also flips requires_grad, which DDP and FSDP2 must not see change during a run:
    this sets only the flag its forward reads (BaseTunerLayer.disable_adapters)."""
    layers = [m for _, m in lora_layers(model)]
    for _, w in token_wrappers(model):  # the wrapper reads its flag for .weight, its layer for the forward
        layers += [w, w.token_adapter]
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
    """W += (alpha / rank) B A in every adapted projection, which becomes a plain nn.Linear again, and the trained
    embedding (head) rows written into their weight; every parameter trainable again (a plain model). In place."""
    def replace(name: str, module: nn.Module) -> None:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, module)

    for name, w in token_wrappers(model):  # a tied head's rows are the embedding's: written once
        if w.token_adapter.tied_adapter is None:
            w.token_adapter.merge(adapter_names=[ADAPTER])
        replace(name, w.token_adapter.get_base_layer())
    for name, layer in lora_layers(model):
        layer.merge(adapter_names=[ADAPTER])
        replace(name, layer.get_base_layer())
    if "peft_config" in vars(model):  # left by peft's injection: a plain model again (LoRA may be added anew)
        del model.peft_config
    return model.requires_grad_(True)


def adapter_tensors(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Our module name (e.g. layers.0.attn.q_proj) -> (A (rank, in), B (out, rank), scaling alpha / rank)."""
    return {n: (m.lora_A[ADAPTER].weight.detach(), m.lora_B[ADAPTER].weight.detach(), float(m.scaling[ADAPTER]))
            for n, m in lora_layers(model)}


def token_rows(model: nn.Module) -> dict[str, tuple[list[int], torch.Tensor]]:
    """Our module name (tok_emb, an untied lm_head) -> (token ids, their trained rows (n, d_model))."""
    return {n: (list(w.token_adapter.token_indices[ADAPTER]), w.token_adapter.trainable_tokens_delta[ADAPTER].detach())
            for n, w in token_wrappers(model) if w.token_adapter.tied_adapter is None}


def lora_record(lc: LoRASection, base: dict, tokens: tuple[list[str], list[int]] = ([], [])) -> dict:
    """lora.json: the settings, the trained embedding rows (token strings and ids) and the base model (path,
    sha256 of its weight files)."""
    return {"rank": lc.rank, "alpha": lc.alpha, "dropout": lc.dropout, "targets": lc.targets,
            "train_tokens": list(tokens[0]), "train_token_ids": list(tokens[1]), "base": base}


def record_token_ids(rec: dict) -> list[int]:
    """The embedding rows a LoRA checkpoint trained (none in one written before lora.train_tokens)."""
    return list(rec.get("train_token_ids", []))


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
        if any(type(i) is not int or i < 0 for i in record_token_ids(rec)):
            raise ValueError("train_token_ids must be token ids")
    except (ValueError, KeyError, TypeError, AttributeError, UserError) as e:
        raise UserError(f"checkpoint '{ckpt}' has an invalid {LORA_FILE} ({str(e).splitlines()[0]}); the file "
                        "was altered or is not from gptforge") from None
    return rec


def record_settings(rec: dict) -> LoRASection:
    from gptforge.config.schema import LoRASection

    return LoRASection(rank=rec["rank"], alpha=rec["alpha"], dropout=rec["dropout"], targets=rec["targets"])
