"""Export a gptforge checkpoint as a Hugging Face model folder (safetensors only, never pickles).

    gptforge export-hf --checkpoint runs/shakespeare --out hf_model [--dtype fp32|bf16|fp16]

arch "gpt2" -> GPT2LMHeadModel, arch "llama" -> LlamaForCausalLM, arch "llama" + model.qk_norm ->
Qwen3ForCausalLM (names and layouts: gptforge.hf.mapping, which also lists the options that cannot export).

The folder holds model.safetensors (or shards + model.safetensors.index.json), config.json,
generation_config.json and the tokenizer (tokenizer.json, tokenizer_config.json with the chat template
when the checkpoint has one, special_tokens_map.json), so `AutoModelForCausalLM.from_pretrained(out)` and
`AutoTokenizer.from_pretrained(out)` load it. transformers itself is not needed to export.
A padded vocabulary (rounded up to a multiple of 64 for speed) is cut back to the tokenizer's: config.vocab_size
is the tokenizer's size (gptforge's own inference masks those rows too: gptforge.hf.inference).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import torch
from safetensors.torch import save_file

from gptforge.checkpoint import checkpoint_dir_of, model_config
from gptforge.data.chat_template import CHAT_TEMPLATE_FILE
from gptforge.data.tokenizer import EOS, IM_END, IM_START, PAD, UNK, load_tokenizer
from gptforge.errors import UserError
from gptforge.fileio import replace_file, write_file_atomic
from gptforge.hf.init_from import load_checkpoint_model
from gptforge.hf.mapping import DTYPE_NAMES, check_exportable, hf_config, to_hf_state_dict

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_SHARD_BYTES = 5 * 1024**3  # as transformers' save_pretrained: one file per 5 GB


# ---- weights ------------------------------------------------------------------------------------
def save_safetensors(tensors: dict[str, torch.Tensor], out_dir: Path, dtype: torch.dtype | None,
                     max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[Path]:
    """model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json."""
    def prep(t: torch.Tensor) -> torch.Tensor:  # own, contiguous, CPU memory: no shared storage
        t = t.to("cpu", dtype=dtype if (dtype is not None and t.is_floating_point()) else t.dtype)
        return t.contiguous().clone()

    shards: list[list[str]] = [[]]
    size = 0
    for k, t in tensors.items():
        n = t.numel() * (torch.finfo(dtype).bits // 8 if dtype is not None and t.is_floating_point()
                         else t.element_size())
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += n
    for old in list(out_dir.glob("model*.safetensors")) + [out_dir / "model.safetensors.index.json"]:
        old.unlink(missing_ok=True)  # a stale shard from an earlier export would confuse loaders
    meta = {"format": "pt"}  # transformers checks this
    if len(shards) == 1:
        f = out_dir / "model.safetensors"
        whole = {k: prep(tensors[k]) for k in shards[0]}
        replace_file(f, lambda tmp: save_file(whole, str(tmp), metadata=meta))  # never through a link
        return [f]
    files, weight_map, total = [], {}, 0
    for i, keys in enumerate(shards):
        f = out_dir / f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        part = {k: prep(tensors[k]) for k in keys}
        total += sum(t.numel() * t.element_size() for t in part.values())
        replace_file(f, lambda tmp, part=part: save_file(part, str(tmp), metadata=meta))
        weight_map.update({k: f.name for k in keys})
        files.append(f)
        del part
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    write_file_atomic(out_dir / "model.safetensors.index.json", json.dumps(index, indent=2) + "\n")
    return files


# ---- tokenizer ----------------------------------------------------------------------------------
def find_chat_template(src: Path) -> str | None:
    """A chat template saved with the checkpoint: chat_template.jinja, or tokenizer_meta.json's field."""
    f = src / CHAT_TEMPLATE_FILE
    if f.is_file():
        return f.read_text()
    meta = src / "tokenizer_meta.json"
    if meta.is_file():
        try:
            t = json.loads(meta.read_text()).get("chat_template")
        except (json.JSONDecodeError, AttributeError):
            return None
        if isinstance(t, str) and t:
            return t
    return None


def export_tokenizer(src: Path, out_dir: Path, model_max_length: int) -> dict[str, int | None]:
    """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json (+ chat template).
    Returns the special ids {"bos", "eos", "pad"}."""
    tok = load_tokenizer(src)  # reserves the chat special tokens exactly as training did
    replace_file(out_dir / "tokenizer.json", lambda tmp: tok.hf.save(str(tmp)))
    vocab = tok.hf.get_vocab(with_added_tokens=True)
    specials = {"bos_token": EOS, "eos_token": EOS, "pad_token": PAD}
    if UNK in vocab:
        specials["unk_token"] = UNK
    extra = [s for s in (IM_START, IM_END) if s in vocab]
    tcfg = {"tokenizer_class": "PreTrainedTokenizerFast", **specials,
            "additional_special_tokens": extra, "model_max_length": model_max_length,
            "clean_up_tokenization_spaces": False, "add_bos_token": False, "add_eos_token": False}
    template = find_chat_template(src)
    if template is not None:
        tcfg["chat_template"] = template
    write_file_atomic(out_dir / "tokenizer_config.json", json.dumps(tcfg, indent=2, ensure_ascii=False) + "\n")
    smap = dict(specials) | ({"additional_special_tokens": extra} if extra else {})
    write_file_atomic(out_dir / "special_tokens_map.json", json.dumps(smap, indent=2) + "\n")
    # a chat model ends its turn with <|im_end|>: transformers' generate must stop there too
    stops = [vocab.get(EOS)] + ([vocab[IM_END]] if template is not None and IM_END in vocab else [])
    return {"bos": vocab.get(EOS), "eos": vocab.get(EOS), "pad": vocab.get(PAD), "stops": stops,
            "vocab": tok.vocab_size}


# ---- export -------------------------------------------------------------------------------------
def export_model(model, cfg, out_dir: str | Path, dtype: str | torch.dtype | None = None,
                 tokenizer_dir: str | Path | None = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write an in-memory GPT (plain, unwrapped) as a Hugging Face folder."""
    dt = _dtype(dtype)
    check_exportable(cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ids: dict = {"bos": None, "eos": None, "pad": None, "stops": [None]}
    if tokenizer_dir is not None and (Path(tokenizer_dir) / "tokenizer.json").is_file():
        ids = export_tokenizer(Path(tokenizer_dir), out, cfg.block_size)
    elif tokenizer_dir is not None:
        print(f"warning: no tokenizer.json in '{tokenizer_dir}'; exporting the model without a tokenizer",
              file=sys.stderr)
    with torch.no_grad():
        tensors = to_hf_state_dict(model.state_dict(), cfg)
    tensors, cfg = drop_padded_rows(tensors, cfg, ids.get("vocab"))
    save_safetensors(tensors, out, dt or torch.float32, max_shard_bytes)
    conf = hf_config(cfg, dt or torch.float32, ids["bos"], ids["eos"], ids["pad"])
    write_file_atomic(out / "config.json", json.dumps(conf, indent=2) + "\n")
    stops = ids["stops"]
    gen = {"_from_model_config": len(stops) == 1, "bos_token_id": ids["bos"],
           "eos_token_id": stops[0] if len(stops) == 1 else stops, "pad_token_id": ids["pad"]}
    write_file_atomic(out / "generation_config.json", json.dumps(gen, indent=2) + "\n")
    return out


def drop_padded_rows(tensors: dict[str, torch.Tensor], cfg, n: int | None):
    """The rows past the tokenizer's `n` ids (the vocabulary rounded up to a multiple of 64 for speed) are no
    token's: without them config.vocab_size is the tokenizer's, and no loader can score or sample them."""
    if n is None or n >= cfg.vocab_size:
        return tensors, cfg
    rows = ("wte.weight", "embed_tokens.weight", "lm_head.weight")
    return ({k: t[:n] if k.endswith(rows) else t for k, t in tensors.items()},
            dataclasses.replace(cfg, vocab_size=n))


def check_out_dir(out: Path, force: bool) -> None:
    """--out must be a folder; a non-empty one (another model's files) only with --force."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out '{out}' is a file; give a folder path for the Hugging Face model")
    if out.is_dir() and not force:
        names = sorted(p.name for p in out.iterdir())
        if names:
            raise UserError(f"--out '{out}' is not empty ({len(names)} entries, e.g. {names[0]}); choose a new "
                            "folder, or pass --force to overwrite its model files")


def export_hf(ckpt_dir: str | Path, out_dir: str | Path, dtype: str | torch.dtype | None = None,
              max_shard_bytes: int = DEFAULT_SHARD_BYTES, force: bool = False) -> Path:
    """A gptforge checkpoint (or run dir -> its latest checkpoint) -> a Hugging Face folder."""
    out = Path(out_dir)
    check_out_dir(out, force)
    ck = checkpoint_dir_of(ckpt_dir)
    if out.resolve() == ck.resolve() or ck.resolve() in out.resolve().parents:
        raise UserError(f"--out '{out}' is inside the checkpoint '{ck}'; choose a separate directory")
    cfg = model_config(ck)
    check_exportable(cfg)  # before spending time on loading
    dt = _dtype(dtype)
    model = load_checkpoint_model(ck, "cpu", cfg)  # a LoRA checkpoint: adapters merged into the weights
    return export_model(model, cfg, out, dt, tokenizer_dir=ck, max_shard_bytes=max_shard_bytes)


def _dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        if dtype is not None and dtype not in DTYPE_NAMES:
            raise UserError(f"unsupported export dtype {dtype}; use fp32, bf16 or fp16")
        return dtype
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise UserError(f"unknown --dtype '{dtype}'; use one of: {', '.join(DTYPES)}") from None


@dataclass
class ExportOptions:
    """Export a checkpoint as a Hugging Face model folder (safetensors)."""

    checkpoint: str
    """checkpoint dir, or a run's out_dir (latest checkpoint)"""
    out: str
    """output folder for the Hugging Face model"""
    dtype: Literal["fp32", "bf16", "fp16"] | None = None
    """weight dtype (default: fp32)"""
    max_shard_gb: float = DEFAULT_SHARD_BYTES / 1024**3
    """split model.safetensors into shards of at most this size in GB"""
    force: bool = False
    """write into a non-empty --out folder (its model files are replaced)"""
    peft_adapter: Optional[str] = None
    """a LoRA checkpoint: also write its adapters alone in PEFT's format to this folder (adapter_config.json,
    adapter_model.safetensors) for peft.PeftModel.from_pretrained onto its base exported with export-hf"""


def main(opts: ExportOptions) -> int:
    if opts.peft_adapter:  # before the export: a clear refusal costs nothing
        check_out_dir(Path(opts.peft_adapter), opts.force)
    out = export_hf(opts.checkpoint, opts.out, opts.dtype, max_shard_bytes=int(opts.max_shard_gb * 1024**3),
                    force=opts.force)
    conf = json.loads((out / "config.json").read_text())
    if opts.peft_adapter:
        from gptforge.hf.peft_export import export_peft_adapter

        print(f"wrote the LoRA adapters in PEFT's format to {export_peft_adapter(opts.checkpoint, opts.peft_adapter)}")
    print(f"wrote {conf['architectures'][0]} ({conf['dtype']}, vocab {conf['vocab_size']}) to {out}; load it with "
          f"transformers.AutoModelForCausalLM.from_pretrained('{out}')")
    return 0
