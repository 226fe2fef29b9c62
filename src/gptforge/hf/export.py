"""Export a gptforge checkpoint as a Hugging Face model folder (safetensors only, never pickles).

    gptforge export-hf --checkpoint runs/shakespeare --out hf_model [--dtype fp32|bf16|fp16]

arch "gpt2"  -> GPT2LMHeadModel: Conv1D layers (weights stored transposed, (in, out)) and one fused
               c_attn = concat(q, k, v); needs bias=True and no grouped-query attention.
arch "llama" -> LlamaForCausalLM: q/k/v/o_proj, gate/up/down_proj, RMSNorm; RoPE rotate-half, as ours.

The folder holds model.safetensors (or shards + model.safetensors.index.json), config.json,
generation_config.json and the tokenizer (tokenizer.json, tokenizer_config.json with the chat template
when the checkpoint has one, special_tokens_map.json), so `AutoModelForCausalLM.from_pretrained(out)` and
`AutoTokenizer.from_pretrained(out)` load it. transformers itself is not needed to export.
A padded vocabulary (rounded up to a multiple of 64) is kept: config.vocab_size is the model's size.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from gptforge.errors import UserError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
DEFAULT_SHARD_BYTES = 5 * 1024**3  # as transformers' save_pretrained: one file per 5 GB
CHAT_TEMPLATE_FILE = "chat_template.jinja"


# ---- checks and config ------------------------------------------------------------------------
def check_exportable(cfg) -> None:
    """Raise UserError when our model has no exact Hugging Face counterpart."""
    if cfg.arch == "gpt2":
        if not cfg.bias:
            raise UserError("this gpt2-style model has bias=False, but Hugging Face GPT2LMHeadModel always has "
                            "biases; only models trained with model.bias=true export as GPT-2")
        if cfg.n_kv_head != cfg.n_head:
            raise UserError(f"this gpt2-style model uses grouped-query attention (n_kv_head={cfg.n_kv_head} < "
                            f"n_head={cfg.n_head}), which GPT2LMHeadModel cannot express; train it with "
                            "model.arch=llama to export GQA")
    elif cfg.arch != "llama":
        raise UserError(f"cannot export model.arch={cfg.arch!r}; supported: gpt2, llama")


def hf_config(cfg, dtype: torch.dtype = torch.float32, bos_id: int | None = None, eos_id: int | None = None,
              pad_id: int | None = None) -> dict:
    """The config.json of the Hugging Face model equal to our GPTConfig `cfg`."""
    check_exportable(cfg)
    dt = DTYPE_NAMES[dtype]
    common = {"vocab_size": cfg.vocab_size, "tie_word_embeddings": bool(cfg.tie_embeddings),
              "bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id,
              "initializer_range": cfg.init_std, "use_cache": True,
              "torch_dtype": dt, "dtype": dt}  # transformers 4.x reads torch_dtype, 5.x dtype
    if cfg.arch == "gpt2":
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
                "n_positions": cfg.block_size, "n_ctx": cfg.block_size, "n_embd": cfg.d_model,
                "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": cfg.d_ff,
                "activation_function": "gelu_new", "layer_norm_epsilon": cfg.norm_eps,
                "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
                "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                "reorder_and_upcast_attn": False} | common
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "max_position_embeddings": cfg.block_size, "hidden_size": cfg.d_model,
            "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layer,
            "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_kv_head,
            "head_dim": cfg.head_dim, "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps,
            "rope_theta": cfg.rope_theta,  # transformers 4.x
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},  # 5.x
            "rope_scaling": None, "attention_bias": bool(cfg.bias), "mlp_bias": bool(cfg.bias),
            "attention_dropout": cfg.dropout, "pretraining_tp": 1} | common


# ---- weights ------------------------------------------------------------------------------------
def to_hf_state_dict(state: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    """Our state dict (names as in gptforge.model.gpt.GPT) -> Hugging Face names and layouts."""
    check_exportable(cfg)
    sd = {k: v.detach() for k, v in state.items()}
    out: dict[str, torch.Tensor] = {}
    if cfg.arch == "gpt2":
        p = "transformer."
        out[p + "wte.weight"] = sd["tok_emb.weight"]
        out[p + "wpe.weight"] = sd["pos_emb.weight"]
        for i in range(cfg.n_layer):
            s, h = f"layers.{i}.", f"{p}h.{i}."
            for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
                out[h + theirs + ".weight"] = sd[s + ours + ".weight"]
                out[h + theirs + ".bias"] = sd[s + ours + ".bias"]
            qkv = [sd[f"{s}attn.{n}_proj.weight"] for n in "qkv"]
            out[h + "attn.c_attn.weight"] = torch.cat(qkv, 0).t()  # Conv1D: (in, out)
            out[h + "attn.c_attn.bias"] = torch.cat([sd[f"{s}attn.{n}_proj.bias"] for n in "qkv"], 0)
            for ours, theirs in (("attn.o_proj", "attn.c_proj"), ("mlp.up_proj", "mlp.c_fc"),
                                 ("mlp.down_proj", "mlp.c_proj")):
                out[h + theirs + ".weight"] = sd[s + ours + ".weight"].t()
                out[h + theirs + ".bias"] = sd[s + ours + ".bias"]
        out[p + "ln_f.weight"] = sd["norm.weight"]
        out[p + "ln_f.bias"] = sd["norm.bias"]
    else:
        p = "model."
        out[p + "embed_tokens.weight"] = sd["tok_emb.weight"]
        names = [("attn_norm", "input_layernorm"), ("mlp_norm", "post_attention_layernorm")]
        names += [(f"attn.{n}_proj", f"self_attn.{n}_proj") for n in "qkvo"]
        names += [(f"mlp.{n}_proj", f"mlp.{n}_proj") for n in ("gate", "up", "down")]
        for i in range(cfg.n_layer):
            for ours, theirs in names:
                for kind in ("weight", "bias"):
                    if f"layers.{i}.{ours}.{kind}" in sd:
                        out[f"{p}layers.{i}.{theirs}.{kind}"] = sd[f"layers.{i}.{ours}.{kind}"]
        out[p + "norm.weight"] = sd["norm.weight"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return out


def save_safetensors(tensors: dict[str, torch.Tensor], out_dir: Path, dtype: torch.dtype | None,
                     max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[Path]:
    """model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json."""
    from safetensors.torch import save_file

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
        save_file({k: prep(tensors[k]) for k in shards[0]}, str(f), metadata=meta)
        return [f]
    files, weight_map, total = [], {}, 0
    for i, keys in enumerate(shards):
        f = out_dir / f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        part = {k: prep(tensors[k]) for k in keys}
        total += sum(t.numel() * t.element_size() for t in part.values())
        save_file(part, str(f), metadata=meta)
        weight_map.update({k: f.name for k in keys})
        files.append(f)
        del part
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
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
    from gptforge.data.tokenizer import EOS, IM_END, IM_START, PAD, UNK, load_tokenizer

    tok = load_tokenizer(src)  # reserves the chat special tokens exactly as training did
    tok.hf.save(str(out_dir / "tokenizer.json"))
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
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2, ensure_ascii=False) + "\n")
    smap = dict(specials) | ({"additional_special_tokens": extra} if extra else {})
    (out_dir / "special_tokens_map.json").write_text(json.dumps(smap, indent=2) + "\n")
    return {"bos": vocab.get(EOS), "eos": vocab.get(EOS), "pad": vocab.get(PAD)}


# ---- export -------------------------------------------------------------------------------------
def export_model(model, cfg, out_dir: str | Path, dtype: str | torch.dtype | None = None,
                 tokenizer_dir: str | Path | None = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write an in-memory GPT (plain, unwrapped) as a Hugging Face folder."""
    dt = _dtype(dtype)
    check_exportable(cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ids: dict[str, int | None] = {"bos": None, "eos": None, "pad": None}
    if tokenizer_dir is not None and (Path(tokenizer_dir) / "tokenizer.json").is_file():
        ids = export_tokenizer(Path(tokenizer_dir), out, cfg.block_size)
    elif tokenizer_dir is not None:
        print(f"warning: no tokenizer.json in '{tokenizer_dir}'; exporting the model without a tokenizer",
              file=sys.stderr)
    with torch.no_grad():
        tensors = to_hf_state_dict(model.state_dict(), cfg)
    save_safetensors(tensors, out, dt or torch.float32, max_shard_bytes)
    conf = hf_config(cfg, dt or torch.float32, ids["bos"], ids["eos"], ids["pad"])
    (out / "config.json").write_text(json.dumps(conf, indent=2) + "\n")
    gen = {"_from_model_config": True, "bos_token_id": ids["bos"], "eos_token_id": ids["eos"],
           "pad_token_id": ids["pad"]}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return out


def export_hf(ckpt_dir: str | Path, out_dir: str | Path, dtype: str | torch.dtype | None = None,
              max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """A gptforge checkpoint (or run dir -> its latest checkpoint) -> a Hugging Face folder."""
    from gptforge.checkpoint import checkpoint_dir_of, load_model, model_config

    ck = checkpoint_dir_of(ckpt_dir)
    out = Path(out_dir)
    if out.resolve() == ck.resolve() or ck.resolve() in out.resolve().parents:
        raise UserError(f"--out '{out}' is inside the checkpoint '{ck}'; choose a separate directory")
    cfg = model_config(ck)
    check_exportable(cfg)  # before spending time on loading
    dt = _dtype(dtype)
    model = load_model(ck, "cpu", cfg)
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="gptforge export-hf",
                                 description="Export a checkpoint as a Hugging Face model folder (safetensors).")
    ap.add_argument("--checkpoint", required=True, help="checkpoint dir, or a run's out_dir (latest checkpoint)")
    ap.add_argument("--out", required=True, help="output folder for the Hugging Face model")
    ap.add_argument("--dtype", choices=list(DTYPES), default=None, help="weight dtype (default: fp32)")
    ap.add_argument("--max-shard-gb", type=float, default=DEFAULT_SHARD_BYTES / 1024**3,
                    help="split model.safetensors into shards of at most this size (default: 5)")
    a = ap.parse_args(argv)
    out = export_hf(a.checkpoint, a.out, a.dtype, max_shard_bytes=int(a.max_shard_gb * 1024**3))
    conf = json.loads((out / "config.json").read_text())
    print(f"wrote {conf['architectures'][0]} ({conf['dtype']}, vocab {conf['vocab_size']}) to {out}; load it with "
          f"transformers.AutoModelForCausalLM.from_pretrained('{out}')")
    return 0
