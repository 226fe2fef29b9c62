"""`--init-from PATH`: start training from a gptforge checkpoint / run dir, or a local Hugging Face folder
(GPT-2, Llama or Qwen3 family, safetensors).

For a Hugging Face model to train, the vocabulary is padded up to a multiple of 64 that also covers the chat
special tokens our tokenizer reserves (GPT-2's 50257 -> 50304); the new embedding rows start as the mean of the
pretrained rows, so new tokens begin with ordinary, not extreme, logits. Inference (gptforge.hf.inference)
keeps the folder's own vocabulary.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import torch

from gptforge.checkpoint import checkpoint_dir_of, load_model_weights, model_config
from gptforge.lora import apply_lora, merge_lora, read_lora_record, record_settings, record_token_ids
from gptforge.config.loader import round_vocab
from gptforge.data.tokenizer import load_tokenizer
from gptforge.errors import UserError
from gptforge.hardware import GiB, memory_for_weights
from gptforge.hf.load import (hf_tokenizer, is_hf_folder, read_hf_config, read_safetensors, safetensors_shapes,
                              weight_files)
from gptforge.hf.mapping import from_hf_state_dict, gpt_config_from_hf
from gptforge.model.cost import count_params
from gptforge.model.gpt import GPT, build_model

_LAYER = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.")  # the layer index in a tensor name (ours, Llama's, GPT-2's)



def _kind(path: str | Path) -> str:
    p = Path(path)
    if not p.exists():
        raise UserError(f"--init-from '{p}' does not exist; give a gptforge checkpoint or run dir, "
                        "or a local Hugging Face model folder")
    return "hf" if is_hf_folder(p) else "gptforge"


def init_model_config(path: str | Path, pad: bool = True):
    """The GPTConfig of the model to start from. pad=False (inference): a Hugging Face folder's vocabulary is
    kept as it is, grown only to hold the ids its tokenizer adds (gptforge.hf.inference masks their logits)."""
    if _kind(path) == "hf":
        conf = read_hf_config(path)
        V = int(conf.get("vocab_size", 0))
        tok = hf_tokenizer(path)
        need = max(V, tok.vocab_size if tok is not None else 0)
        return gpt_config_from_hf(conf, vocab_size=round_vocab(need) if pad else need)
    return model_config(checkpoint_dir_of(path))


@torch.no_grad()
def load_init_weights(path: str | Path, model) -> None:
    """Copy the weights at `path` into `model` (plain, unwrapped, built from init_model_config(path)); a LoRA
    checkpoint's adapters merged into its base."""
    if _kind(path) == "gptforge":
        ck = checkpoint_dir_of(path)
        if read_lora_record(ck) is not None:
            merge_lora(load_lora(ck, model))
        else:
            load_model_weights(ck, model)
        return
    conf = read_hf_config(path)
    hcfg = gpt_config_from_hf(conf)
    sd = from_hf_state_dict(read_safetensors(weight_files(path), torch.float32), hcfg)
    params = dict(model.named_parameters(remove_duplicate=False))
    missing = [k for k in params if k not in sd]
    if missing:
        raise UserError(f"--init-from '{path}': the model has '{missing[0]}' which the Hugging Face weights "
                        "lack; build the model from init_model_config of the same folder")
    for name, p in params.items():
        if name == "lm_head.weight" and model.cfg.tie_embeddings:
            continue  # the same tensor as tok_emb.weight
        src = sd[name]
        _check_shape(path, name, tuple(src.shape), tuple(p.shape))
        if src.shape[0] != p.shape[0]:  # vocabulary rows the model adds: the mean of the pretrained rows
            p[: src.shape[0]].copy_(src)
            p[src.shape[0]:].copy_(src.mean(0, keepdim=True).expand(p.shape[0] - src.shape[0], -1))
            continue
        p.copy_(src)


def _check_shape(path, name: str, have: tuple[int, ...], want: tuple[int, ...]) -> None:
    """The weights' tensor `name` (shape `have`) fits the model's (`want`): the same shape, or for the embedding
    and output head fewer vocabulary rows (the model's extra rows are filled in)."""
    if have == want:
        return
    if name in ("tok_emb.weight", "lm_head.weight") and have[1:] == want[1:] and have[0] < want[0]:
        return
    raise UserError(f"'{path}': the weights' '{name}' has shape {have}, the model built from its config "
                    f"{want}; the config and the weights do not match (was one of them replaced?)")


def check_weights_fit(path: str | Path, cfg) -> None:
    """Before a model is built from a config read at `path` (config.json, model_config.json: files that may come
    from elsewhere): its layers are the weights' layers, it fits in the memory there is, and each tensor has the
    shape the weights hold. Only file headers are read and the model is built on the meta device, so an absurd
    config (a million layers, a 65536-wide model) is a one-line error instead of an allocation."""
    shapes = _weight_shapes(path)
    if shapes is not None:
        layers = len({int(m.group(1)) for k in shapes if (m := _LAYER.search(k))})
        if layers != cfg.n_layer:
            raise UserError(f"'{path}': its config asks for {cfg.n_layer:,} layers but its weights hold {layers}; "
                            "the config and the weights do not match (was one of them replaced?)")
    n = count_params(cfg) + cfg.block_size * cfg.head_dim  # the parameters and the RoPE tables
    have = memory_for_weights()
    if 4 * n > have:
        raise UserError(f"'{path}': its config asks for a model of {n:,} parameters ({4 * n / GiB:,.1f} GiB in "
                        f"float32), more than the {have / GiB:,.1f} GiB of memory there is; the config is wrong, "
                        "or the model is too large for this machine")
    if shapes is None:
        return
    with torch.device("meta"):
        model = GPT(cfg)
    if _kind(path) == "hf":
        hf = {k: torch.empty(v, device="meta") for k, v in shapes.items()}
        shapes = {f"model.{k}": tuple(t.shape) for k, t in
                  from_hf_state_dict(hf, gpt_config_from_hf(read_hf_config(path))).items()}
    for name, p in model.named_parameters():
        if f"model.{name}" in shapes:
            _check_shape(path, name, shapes[f"model.{name}"], tuple(p.shape))


def _weight_shapes(path: str | Path) -> dict[str, tuple[int, ...]] | None:
    """name -> shape of the tensors at `path` from the files' headers (a Hugging Face folder's names, or a
    checkpoint's: model.NAME); None where they cannot be read (then loading names the problem), and for a LoRA
    checkpoint, which holds adapters only (its base's tensors are checked as they are copied in)."""
    if _kind(path) == "hf":
        return safetensors_shapes(weight_files(path))
    try:
        ck = checkpoint_dir_of(path)
        from gptforge.checkpoint.safe_load import tensor_shapes  # DCP's import (~45 MiB) only when it reads

        return None if read_lora_record(ck) is not None else tensor_shapes(ck)
    except Exception:  # noqa: BLE001 - a damaged or crafted checkpoint: the load reports it, in one line
        return None


def load_checkpoint_model(ck: Path, device: str | torch.device = "cpu", mcfg=None):
    """A plain GPT with a gptforge checkpoint's weights on `device` (inference, export): a LoRA checkpoint's
    adapters merged into its base."""
    mcfg = mcfg or model_config(ck)
    check_weights_fit(ck, mcfg)
    model = build_model(mcfg, device)
    load_init_weights(ck, model)
    return model


def weights_digest(path: str | Path) -> str:
    """sha256 of the files that hold a model's weights: a gptforge checkpoint's tensor files (.metadata,
    *.distcp) or a Hugging Face folder's safetensors and config.json; names and bytes, in name order."""
    if _kind(path) == "hf":
        files = [*weight_files(path), Path(path) / "config.json"]
    else:
        ck = checkpoint_dir_of(path)
        files = [ck / ".metadata", *ck.glob("*.distcp")]
    h = hashlib.sha256()
    for f in sorted(files, key=lambda f: f.name):
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def base_reference(path: str | Path) -> dict:
    """The base of a LoRA run, as its lora.json names it: the exact folder (a run dir -> its checkpoint then)
    and the sha256 of its weights (weights_digest)."""
    folder = Path(path) if _kind(path) == "hf" else checkpoint_dir_of(path)
    return {"path": str(folder.resolve()), "sha256": weights_digest(folder)}


def load_lora(ck: Path, model):
    """The LoRA checkpoint `ck` into `model` (plain, built from its model_config.json): its base's weights
    (checked against the sha256 in lora.json), then the adapters, unmerged. -> model (gptforge.lora)."""
    rec = read_lora_record(ck)
    base = rec["base"]
    if not Path(base["path"]).exists():
        raise UserError(f"LoRA checkpoint '{ck}' holds only adapters and its base '{base['path']}' is gone; "
                        "put the base model back at that path (or edit lora.json's base path to where it is now)")
    if weights_digest(base["path"]) != base.get("sha256"):
        raise UserError(f"LoRA checkpoint '{ck}': its base '{base['path']}' has other weights than it was trained "
                        f"on (sha256 differs from {str(base.get('sha256'))[:12]}); restore that base model")
    load_init_weights(base["path"], model)
    apply_lora(model, record_settings(rec), record_token_ids(rec))
    load_model_weights(ck, model)  # the adapters only (gptforge.checkpoint: a LoRA model's trainable parameters)
    return model


def init_tokenizer(path: str | Path):
    """Our Tokenizer saved with the checkpoint, or the Hugging Face folder's."""
    if _kind(path) == "hf":
        tok = hf_tokenizer(path)
        if tok is None:
            raise UserError(f"Hugging Face folder '{path}' has no tokenizer (tokenizer.json, or vocab.json + "
                            "merges.txt); copy the model's tokenizer files into it")
        return tok
    return load_tokenizer(checkpoint_dir_of(path))
