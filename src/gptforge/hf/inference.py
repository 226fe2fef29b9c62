"""Load a model for inference (generate, chat, serve, eval) from whatever the user points at: a run
folder (its latest checkpoint), a checkpoint folder, or a Hugging Face folder (ours or a compatible one)."""

from __future__ import annotations

import json
from pathlib import Path

from gptforge.checkpoint import checkpoint_dir_of, load_model
from gptforge.data.chat_template import CHAT_TEMPLATE_FILE
from gptforge.data.tokenizer import load_tokenizer
from gptforge.hf.load import is_hf_folder
from gptforge.parallel.mesh import pick_device


def load_for_inference(checkpoint: str, device: str = "auto"):
    """-> (model, tokenizer, saved config dict) from a checkpoint dir or a run dir."""
    ck = checkpoint_dir_of(checkpoint)
    model = load_model(ck, pick_device(device)).eval()
    tok = load_tokenizer(ck)
    cfg = json.loads((ck / "config.json").read_text()) if (ck / "config.json").is_file() else {}
    return model, tok, cfg


def load_any(checkpoint: str, device: str = "auto"):
    """-> (model, tokenizer, has a chat template) from a run/checkpoint dir or a Hugging Face folder."""
    if is_hf_folder(checkpoint):
        from gptforge.hf.init_from import init_model_config, init_tokenizer, load_init_weights
        from gptforge.model.gpt import build_model

        model = build_model(init_model_config(checkpoint), pick_device(device))
        load_init_weights(checkpoint, model)
        folder = Path(checkpoint)
        conf = folder / "tokenizer_config.json"
        chat = (folder / CHAT_TEMPLATE_FILE).is_file() or (
            conf.is_file() and bool(json.loads(conf.read_text()).get("chat_template")))
        return model.eval(), init_tokenizer(checkpoint), chat
    model, tok, _ = load_for_inference(checkpoint, device)
    return model, tok, (checkpoint_dir_of(checkpoint) / CHAT_TEMPLATE_FILE).is_file()
