"""Read a local Hugging Face model folder (GPT-2, Llama or Qwen3 family): its config, weights and tokenizer.
`--init-from` (gptforge.hf.init_from) turns them into our GPT with gptforge.hf.mapping: the inverse of export-hf.

Reads config.json and safetensors only (model.safetensors, or shards with model.safetensors.index.json);
PyTorch pickles (pytorch_model.bin, *.pt) are refused, since unpickling can run code.
Supported: model_type "gpt2" (gpt2, distilgpt2, our own exports), "llama" (TinyLlama, our exports) and
"qwen3" (our exports of arch llama + qk_norm; Qwen3 models whose head_dim is hidden_size / heads).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from gptforge.data.chat_template import CHAT_TEMPLATE_FILE
from gptforge.data.tokenizer import bpe_from_files, load_tokenizer
from gptforge.errors import UserError

_PICKLES = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def is_hf_folder(path: str | Path) -> bool:
    """A folder with a Hugging Face config.json (has model_type) and no gptforge trainer state."""
    p = Path(path)
    f = p / "config.json"
    if not f.is_file() or (p / "trainer_state.json").is_file() or (p / "checkpoints").is_dir():
        return False
    try:
        conf = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(conf, dict) and "model_type" in conf


def read_hf_config(folder: str | Path) -> dict:
    f = Path(folder) / "config.json"
    if not f.is_file():
        raise UserError(f"'{folder}' is not a Hugging Face model folder: config.json is missing")
    try:
        conf = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"'{f}' is not valid JSON ({e.msg}); re-download the model") from None
    if not isinstance(conf, dict) or "model_type" not in conf:
        raise UserError(f"'{f}' has no model_type; it is not a Hugging Face model config")
    return conf


def weight_files(folder: str | Path) -> list[Path]:
    """The safetensors files of a folder; a clear error for pickles or nothing."""
    p = Path(folder)
    index = p / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError):
            raise UserError(f"'{index}' is corrupt (no weight_map); re-download the model") from None
        missing = [n for n in names if not (p / n).is_file()]
        if missing:
            raise UserError(f"'{p}' is incomplete: shard {missing[0]} named in {index.name} is missing")
        return [p / n for n in names]
    if (p / "model.safetensors").is_file():
        return [p / "model.safetensors"]
    found = sorted(p.glob("*.safetensors"))
    if found:
        return found
    pickles = sorted({f.name for pat in _PICKLES for f in p.glob(pat)})
    if pickles:
        raise UserError(f"'{p}' has only PyTorch pickle weights ({', '.join(pickles[:3])}); gptforge loads "
                        "safetensors only (unpickling can run code). Convert it where you trust the file: "
                        "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)")
    raise UserError(f"'{p}' has no model weights (model.safetensors); download the model's safetensors files")


def read_safetensors(files: list[Path], dtype: torch.dtype | None = torch.float32) -> dict[str, torch.Tensor]:
    from safetensors import safe_open  # here: a training run that never reads a folder never loads it
    out: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                for k in st.keys():
                    t = st.get_tensor(k)
                    out[k] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise UserError(f"'{f}' is not a readable safetensors file ({str(e).splitlines()[0][:150]}); "
                            "re-download it") from None
    return out


def safetensors_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Every tensor's name and shape (only the headers are read): a config can be checked against the weights
    before anything is allocated."""
    from safetensors import safe_open
    out: dict[str, tuple[int, ...]] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                for k in st.keys():
                    out[k] = tuple(st.get_slice(k).get_shape())
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise UserError(f"'{f}' is not a readable safetensors file ({str(e).splitlines()[0][:150]}); "
                            "re-download it") from None
    return out


def hf_tokenizer(folder: str | Path):
    """Our Tokenizer from a Hugging Face folder (tokenizer.json, or GPT-2's vocab.json + merges.txt);
    None when it has neither."""
    p = Path(folder)
    if (p / "tokenizer.json").is_file():
        return load_tokenizer(p)
    if (p / "vocab.json").is_file() and (p / "merges.txt").is_file():
        return bpe_from_files(p / "vocab.json", p / "merges.txt")
    return None


def _json_file(path: Path) -> dict:
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"'{path}' is not valid JSON; re-download the model") from None
    return data if isinstance(data, dict) else {}


def _token_text(value) -> str | None:
    """A tokenizer_config.json special token: a string or {"content": ...}."""
    value = value.get("content") if isinstance(value, dict) else value
    return value if isinstance(value, str) and value else None


def folder_eos_ids(folder: str | Path, tok) -> list[int]:
    """The folder's end token(s), where transformers' generate finds them: generation_config.json's
    eos_token_id (an id or a list), else config.json's, else tokenizer_config.json's eos_token. [] if none."""
    p = Path(folder)
    for conf in (_json_file(p / "generation_config.json"), _json_file(p / "config.json")):
        ids = conf.get("eos_token_id")
        ids = [ids] if isinstance(ids, int) else ids
        if isinstance(ids, list) and ids and all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids):
            return list(dict.fromkeys(ids))
    text = _token_text(_json_file(p / "tokenizer_config.json").get("eos_token"))
    i = tok.hf.token_to_id(text) if text else None
    return [i] if i is not None else []


def folder_chat_template(folder: str | Path) -> str | None:
    """The folder's chat template (chat_template.jinja, else tokenizer_config.json's chat_template; of a list
    of named templates, the "default" one), as transformers reads it."""
    p = Path(folder)
    if (p / CHAT_TEMPLATE_FILE).is_file():
        return (p / CHAT_TEMPLATE_FILE).read_text()
    t = _json_file(p / "tokenizer_config.json").get("chat_template")
    if isinstance(t, list):
        t = next((x.get("template") for x in t if isinstance(x, dict) and x.get("name") == "default"), None)
    return t if isinstance(t, str) and t else None


def folder_special_tokens(folder: str | Path) -> dict:
    """bos_token, eos_token, unk_token, pad_token (strings) of tokenizer_config.json: what a chat template sees."""
    conf = _json_file(Path(folder) / "tokenizer_config.json")
    return {k: _token_text(conf.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
