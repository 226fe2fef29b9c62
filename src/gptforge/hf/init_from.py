"""`--init-from PATH`: start training from a gptforge checkpoint / run dir, or a local Hugging Face folder
(GPT-2, Llama or Qwen3 family, safetensors).

For a Hugging Face model to train, the vocabulary is padded up to a multiple of 64 that also covers the chat
special tokens our tokenizer reserves (GPT-2's 50257 -> 50304); the new embedding rows start as the mean of the
pretrained rows, so new tokens begin with ordinary, not extreme, logits. Inference (gptforge.hf.inference)
keeps the folder's own vocabulary.
"""

from __future__ import annotations

from pathlib import Path

import torch

from gptforge.checkpoint import checkpoint_dir_of, load_model_weights, model_config
from gptforge.config.loader import round_vocab
from gptforge.data.tokenizer import load_tokenizer
from gptforge.errors import UserError
from gptforge.hf.load import hf_tokenizer, is_hf_folder, read_hf_config, read_safetensors, weight_files
from gptforge.hf.mapping import from_hf_state_dict, gpt_config_from_hf



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
    """Copy the weights at `path` into `model` (plain, unwrapped, built from init_model_config(path))."""
    if _kind(path) == "gptforge":
        load_model_weights(checkpoint_dir_of(path), model)
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
        if name in ("tok_emb.weight", "lm_head.weight") and src.shape[0] != p.shape[0]:
            if src.shape[0] > p.shape[0] or src.shape[1:] != p.shape[1:]:
                raise UserError(f"--init-from '{path}': '{name}' has shape {tuple(src.shape)}, the model "
                                f"{tuple(p.shape)}; the model's vocab must be at least the checkpoint's")
            p[: src.shape[0]].copy_(src)
            p[src.shape[0]:].copy_(src.mean(0, keepdim=True).expand(p.shape[0] - src.shape[0], -1))
            continue
        if src.shape != p.shape:
            raise UserError(f"--init-from '{path}': '{name}' has shape {tuple(src.shape)}, the model "
                            f"{tuple(p.shape)}; build the model from init_model_config of the same folder")
        p.copy_(src)


def init_tokenizer(path: str | Path):
    """Our Tokenizer saved with the checkpoint, or the Hugging Face folder's."""
    if _kind(path) == "hf":
        tok = hf_tokenizer(path)
        if tok is None:
            raise UserError(f"Hugging Face folder '{path}' has no tokenizer (tokenizer.json, or vocab.json + "
                            "merges.txt); copy the model's tokenizer files into it")
        return tok
    return load_tokenizer(checkpoint_dir_of(path))
