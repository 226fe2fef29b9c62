"""export-hf --peft-adapter DIR: a LoRA checkpoint's adapters alone, in PEFT's format (adapter_config.json +
adapter_model.safetensors with PEFT's key names), for users of peft:

    base = AutoModelForCausalLM.from_pretrained(BASE_HF)     # export-hf of the LoRA run's base checkpoint
    model = PeftModel.from_pretrained(base, DIR)              # the logits of our unmerged LoRA model

Names: our projections -> the Hugging Face modules (gptforge.hf.mapping.name_map). GPT-2's fused
c_attn = concat(q, k, v) gets one adapter of rank k*r (k of q, k, v adapted): A = concat(A_q, A_k, A_v) and B
block-diagonal, exactly the sum of the three adapters; rank_pattern / alpha_pattern keep its scale alpha / r.
Embedding rows trained with lora.train_tokens go in as PEFT's trainable_token_indices (PEFT >= 0.15): the rows of
the embedding (and of an untied lm_head; PEFT ties a tied head to the embedding's rows itself)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from gptforge.checkpoint import checkpoint_dir_of, model_config
from gptforge.errors import UserError
from gptforge.hf.init_from import load_lora
from gptforge.hf.mapping import check_exportable, name_map
from gptforge.lora import adapter_tensors, read_lora_record, require_peft, token_rows
from gptforge.model.gpt import build_model

PEFT_PREFIX = "base_model.model."  # PEFT's saved keys: the PeftModel's names with the adapter name removed


def _projections(cfg) -> list[tuple[str, tuple[str, ...]]]:
    """(Hugging Face module, our projections concatenated into it, in order) of every projection weight."""
    w = ".weight"
    return [(e.hf[:-len(w)], tuple(o[:-len(w)] for o in e.ours))
            for e in name_map(cfg) if e.hf.endswith(w) and e.ours[0].endswith("_proj" + w)]


def _fused(parts: list, outs: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One adapter equal to the sum of adapters on row blocks of one weight: A stacked, B block-diagonal."""
    got = [p for p in parts if p is not None]
    A = torch.cat([a for a, _ in got], 0)
    B = torch.zeros(sum(outs), A.shape[0], dtype=A.dtype)
    row = col = 0
    for p, n in zip(parts, outs):
        if p is not None:
            B[row:row + n, col:col + p[1].shape[1]] = p[1]
            col += p[1].shape[1]
        row += n
    return A, B


def peft_state_dict(adapters: dict, cfg) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Our adapters (gptforge.lora.adapter_tensors) -> (PEFT's state dict, {Hugging Face module: rank})."""
    tensors, ranks = {}, {}
    for hf, ours in _projections(cfg):
        parts = [(adapters[o][0], adapters[o][1]) if o in adapters else None for o in ours]
        if all(p is None for p in parts):
            continue
        A, B = parts[0] if len(parts) == 1 else _fused(parts, [cfg.d_model] * len(parts))  # gpt2: no GQA
        tensors[f"{PEFT_PREFIX}{hf}.lora_A.weight"] = A.detach().float().contiguous().clone()
        tensors[f"{PEFT_PREFIX}{hf}.lora_B.weight"] = B.detach().float().contiguous().clone()
        ranks[hf] = A.shape[0]
    return tensors, ranks


def peft_token_rows(rows: dict, cfg) -> tuple[dict[str, torch.Tensor], list[int] | dict[str, list[int]] | None]:
    """Our trained embedding rows (gptforge.lora.token_rows) -> (PEFT's tensors, its trainable_token_indices: the
    ids for a tied head, {embedding module: ids, lm_head: ids} for an untied one)."""
    hf = {e.ours[0]: e.hf[:-len(".weight")] for e in name_map(cfg) if e.ours[0] in ("tok_emb.weight", "lm_head.weight")}
    tensors, indices = {}, {}
    for ours, (ids, values) in rows.items():
        module = hf[f"{ours}.weight"]
        tensors[f"{PEFT_PREFIX}{module}.token_adapter.trainable_tokens_delta"] = values.float().contiguous().clone()
        indices[module.rsplit(".", 1)[-1]] = ids
    if not indices:
        return tensors, None
    return tensors, (next(iter(indices.values())) if len(indices) == 1 else indices)


def export_peft_adapter(ckpt_dir: str | Path, out_dir: str | Path) -> Path:
    """The adapters of a LoRA checkpoint (or run dir) -> a PEFT adapter folder."""
    ck = checkpoint_dir_of(ckpt_dir)
    rec = read_lora_record(ck)
    if rec is None:
        raise UserError(f"--peft-adapter: checkpoint '{ck}' has no LoRA adapters (no lora.json); it was trained "
                        "with lora.rank 0, so export-hf alone holds all of it")
    cfg = model_config(ck)
    check_exportable(cfg)
    model = load_lora(ck, build_model(cfg, "cpu"))
    tensors, ranks = peft_state_dict(adapter_tensors(model), cfg)
    rows, token_indices = peft_token_rows(token_rows(model), cfg)
    r, alpha = rec["rank"], float(rec["alpha"])
    short = {hf.rsplit(".", 1)[-1]: k for hf, k in ranks.items() if k != r}  # c_attn: k * r
    conf = require_peft().LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=rec["dropout"], target_modules=sorted(ranks), bias="none",
        task_type="CAUSAL_LM", fan_in_fan_out=cfg.arch == "gpt2", base_model_name_or_path=rec["base"]["path"],
        rank_pattern=short, alpha_pattern={n: alpha * k / r for n, k in short.items()},
        trainable_token_indices=token_indices)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    conf.save_pretrained(str(out))
    save_file(tensors | rows, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out
