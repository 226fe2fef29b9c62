"""Load a model for inference (generate, chat, serve, eval) from whatever the user points at: a run
folder (its latest checkpoint), a checkpoint folder, or a Hugging Face folder (ours or a compatible one).

A Hugging Face folder keeps its own vocabulary (config.json's vocab_size, as transformers does): no rows
are padded in for speed, so its logits, losses and samples are the folder's. Ids the tokenizer adds beyond
that vocabulary (the special tokens gptforge.data.tokenizer reserves, on a foreign tokenizer) get input
rows but their logits are -inf: they are never predicted and never take probability mass."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from gptforge.checkpoint import checkpoint_dir_of, load_model
from gptforge.data.chat_template import CHAT_TEMPLATE_FILE
from gptforge.data.tokenizer import load_tokenizer
from gptforge.hf.load import is_hf_folder, read_hf_config
from gptforge.parallel.mesh import pick_device


def has_chat_template(checkpoint: str) -> bool:
    """Whether the run/checkpoint dir or Hugging Face folder carries a chat template."""
    if is_hf_folder(checkpoint):
        folder = Path(checkpoint)
        conf = folder / "tokenizer_config.json"
        return (folder / CHAT_TEMPLATE_FILE).is_file() or (
            conf.is_file() and bool(json.loads(conf.read_text()).get("chat_template")))
    return (checkpoint_dir_of(checkpoint) / CHAT_TEMPLATE_FILE).is_file()


def _mask_logits_from(model, n: int) -> None:
    """Logits of ids >= n become -inf in every forward that returns logits (inference only)."""
    def hook(_module, _args, out):
        if isinstance(out, torch.Tensor) and out.dim() == 3 and out.shape[-1] == model.cfg.vocab_size:
            out[..., n:] = float("-inf")
        return out

    model.register_forward_hook(hook)


def load_for_inference(checkpoint: str, device: str = "auto"):
    """-> (model in eval mode, tokenizer, has a chat template) from a run/checkpoint dir or a Hugging Face
    folder: the one loader of generate, chat, serve and eval."""
    if is_hf_folder(checkpoint):
        from gptforge.hf.init_from import init_model_config, init_tokenizer, load_init_weights
        from gptforge.model.gpt import build_model

        model = build_model(init_model_config(checkpoint, pad=False), pick_device(device))
        load_init_weights(checkpoint, model)
        n = int(read_hf_config(checkpoint)["vocab_size"])
        if model.cfg.vocab_size > n:
            _mask_logits_from(model, n)
        return model.eval(), init_tokenizer(checkpoint), has_chat_template(checkpoint)
    ck = checkpoint_dir_of(checkpoint)
    return load_model(ck, pick_device(device)).eval(), load_tokenizer(ck), has_chat_template(checkpoint)
