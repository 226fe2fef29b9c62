"""Load a model for inference (generate, chat, serve, eval) from whatever the user points at: a run
folder (its latest checkpoint), a checkpoint folder, or a Hugging Face folder (ours or a compatible one).

A Hugging Face folder keeps its own vocabulary (config.json's vocab_size, as transformers does): no rows
are padded in for speed, so its logits, losses and samples are the folder's. Ids the tokenizer adds beyond
that vocabulary (the special tokens gptforge.data.tokenizer reserves, on a foreign tokenizer) get input
rows but their logits are -inf: they are never predicted and never take probability mass. Likewise the rows
a gptforge checkpoint's vocabulary is padded with (a multiple of 64): their logits are -inf at inference, and
export-hf leaves them out.

The tokenizer is set up to prompt the model as its folder says (transformers' way): prompts get the BOS its
post-processor adds (Tokenizer.encode_prompt); generation ends at the folder's eos ids (generation_config.json,
else config.json, else tokenizer_config.json); a folder with its own chat template (not our ChatML) is
prompted with it (data.chat_template.FolderTemplate). A gptforge checkpoint ends at <|endoftext|>, and a chat
checkpoint at <|im_end|> too, as its export's generation_config.json says."""

from __future__ import annotations

import torch

from gptforge.checkpoint import checkpoint_dir_of
from gptforge.data.chat_template import CHAT_TEMPLATE_FILE, CHATML_JINJA, FolderTemplate
from gptforge.data.tokenizer import IM_END, load_tokenizer
from gptforge.hf.load import (folder_chat_template, folder_eos_ids, folder_special_tokens, is_hf_folder,
                              read_hf_config)
from gptforge.parallel.mesh import pick_device


def has_chat_template(checkpoint: str) -> bool:
    """Whether the run/checkpoint dir or Hugging Face folder carries a chat template."""
    if is_hf_folder(checkpoint):
        return folder_chat_template(checkpoint) is not None
    return (checkpoint_dir_of(checkpoint) / CHAT_TEMPLATE_FILE).is_file()


def _mask_logits_from(model, n: int) -> None:
    """Logits of ids >= n become -inf in every forward that returns logits (inference only; a forward with a
    `head` returns something else: a distillation teacher's hidden states)."""
    def hook(_module, _args, kwargs, out):
        if (kwargs.get("head") is None and isinstance(out, torch.Tensor) and out.dim() == 3
                and out.shape[-1] == model.cfg.vocab_size):
            out[..., n:] = float("-inf")
        return out

    model.register_forward_hook(hook, with_kwargs=True)


def load_for_inference(checkpoint: str, device: str = "auto"):
    """-> (model in eval mode, tokenizer, has a chat template) from a run/checkpoint dir or a Hugging Face
    folder: the one loader of generate, chat, serve and eval."""
    if is_hf_folder(checkpoint):
        from gptforge.hf.init_from import check_weights_fit, init_model_config, init_tokenizer, load_init_weights
        from gptforge.model.gpt import build_model

        cfg = init_model_config(checkpoint, pad=False)
        check_weights_fit(checkpoint, cfg)  # before anything is allocated: the folder may come from elsewhere
        model = build_model(cfg, pick_device(device))
        load_init_weights(checkpoint, model)
        n = int(read_hf_config(checkpoint)["vocab_size"])
        if model.cfg.vocab_size > n:
            _mask_logits_from(model, n)
        return model.eval(), folder_prompting(checkpoint, init_tokenizer(checkpoint)), has_chat_template(checkpoint)
    ck = checkpoint_dir_of(checkpoint)
    tok, chat = load_tokenizer(ck), has_chat_template(checkpoint)
    if chat:  # a chat model ends its text with its turn, as its export's generation_config says
        tok.end_ids = frozenset({tok.eos_id, tok.special[IM_END]})
    from gptforge.hf.init_from import load_checkpoint_model  # a LoRA checkpoint: adapters merged into its base

    model = load_checkpoint_model(ck, pick_device(device)).eval()
    if model.cfg.vocab_size > tok.vocab_size:  # rows padded in for speed: no token's, never scored nor sampled
        _mask_logits_from(model, tok.vocab_size)
    return model, tok, chat


def folder_prompting(folder: str, tok):
    """`tok` set up to prompt the Hugging Face folder's model: its end tokens, its own chat template."""
    ends = folder_eos_ids(folder, tok)
    if ends:
        tok.end_ids, tok.doc_end = frozenset(ends), ends[0]
    template = folder_chat_template(folder)
    if template is not None and template != CHATML_JINJA:  # ours (an export) stays the ChatML of training
        tokens = {k: v for k, v in folder_special_tokens(folder).items() if v is not None}
        tok.chat_template = FolderTemplate(template, tokens)
    return tok
