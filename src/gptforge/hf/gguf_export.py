"""Export a gptforge checkpoint as one GGUF file, for llama.cpp, Ollama and LM Studio.

    gptforge export-gguf --checkpoint runs/chat --out model.gguf [--type f32|f16|bf16|q8_0]

Written with the `gguf` package (ggml's own Python library, 0.17 or later: pip install "gptforge[gguf]").
Architectures, as llama.cpp names them:
  arch "gpt2"                   -> gpt2  (learned positions, LayerNorm, tanh-GELU, fused attn_qkv)
  arch "llama"                  -> llama (RoPE, RMSNorm, SwiGLU; q/k rows permuted to llama.cpp's RoPE layout)
  arch "llama" + model.qk_norm  -> qwen3 (Llama + per-head q/k RMSNorm; rotate-half RoPE, as ours)
The options with no llama.cpp counterpart are refused exactly as export-hf refuses them
(gptforge.hf.mapping.check_exportable: logit soft-capping, relu2, qk_norm on gpt2, ...).

Tokenizer: tokenizer.ggml.model "gpt2" (byte-level BPE) with tokenizer.ggml.pre "gpt-2", whose split rule
is the byte-level regex of our `bpe` and `gpt2` kinds
('s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+).
The `char` kind has no pre-tokenizer of its own in llama.cpp; it is mapped exactly onto a byte-level BPE: one
token per character (its UTF-8 bytes in byte-level form) and merges that only join the bytes of one character,
so any split rule gives one token per character. A character the char tokenizer never saw is <|unk|> in
gptforge but is dropped by llama.cpp (which has no unknown-token fallback for BPE).
Special tokens are control tokens; BOS is not added; <|im_end|> is the end-of-turn token when the checkpoint
has a chat template (written as tokenizer.chat_template), so a chat turn stops there.
A padded vocabulary (rounded up to a multiple of 64) is cut back to the tokenizer's size.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from gptforge.checkpoint import checkpoint_dir_of, model_config
from gptforge.data.tokenizer import EOS, IM_END, PAD, UNK, Tokenizer, load_tokenizer
from gptforge.errors import UserError
from gptforge.fileio import replace_file
from gptforge.hf.export import find_chat_template
from gptforge.hf.init_from import load_checkpoint_model
from gptforge.hf.mapping import check_exportable

TYPES = ("f32", "f16", "bf16", "q8_0")
PRE_TOKENIZER = "gpt-2"  # llama.cpp's name for GPT-2's byte-level split regex
_TOKEN_NORMAL, _TOKEN_CONTROL = 1, 3  # gguf.TokenType


def _gguf():
    try:
        import gguf
    except ImportError:
        raise UserError("writing GGUF needs the package 'gguf'; install it with: pip install gguf") from None
    return gguf


def gguf_arch(cfg) -> str:
    """llama.cpp's architecture name for our config (after check_exportable)."""
    if cfg.arch == "gpt2":
        return "gpt2"
    return "qwen3" if cfg.qk_norm else "llama"


def check_gguf_exportable(cfg) -> None:
    """UserError (one line) for a model llama.cpp cannot run exactly."""
    try:
        check_exportable(cfg)
    except UserError as e:
        raise UserError(f"cannot export GGUF: {e}") from None


# ---- tokenizer ----------------------------------------------------------------------------------
def _byte_level_table() -> dict[int, str]:
    """GPT-2's byte -> printable character map (the byte-level alphabet)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    table, n = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return table


def _char_vocab(tokens: list[str], specials: set[int]) -> tuple[list[str], list[str]]:
    """A char tokenizer as byte-level BPE: each character's UTF-8 bytes in byte-level form, and merges that
    build each multi-byte character from its bytes (left to right)."""
    table = _byte_level_table()
    out, merges, seen = [], [], set()
    for i, t in enumerate(tokens):
        if i in specials:
            out.append(t)
            continue
        parts = [table[b] for b in t.encode("utf-8")]
        out.append("".join(parts))
        for k in range(1, len(parts)):
            m = f"{''.join(parts[:k])} {parts[k]}"
            if m not in seen:
                seen.add(m)
                merges.append(m)
    return out, merges


def _merges(tok: Tokenizer) -> list[str]:
    merges = json.loads(tok.hf.to_str())["model"].get("merges") or []
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


def tokenizer_fields(tok: Tokenizer) -> dict:
    """tokens, token types, merges and special ids of a gptforge tokenizer, as llama.cpp's gpt2 vocabulary."""
    vocab = tok.hf.get_vocab(with_added_tokens=True)
    tokens: list[str | None] = [None] * tok.vocab_size
    for t, i in vocab.items():
        tokens[i] = t
    holes = [i for i, t in enumerate(tokens) if t is None]
    if holes:
        raise UserError(f"the tokenizer has no token for id {holes[0]}; GGUF needs ids 0..{tok.vocab_size - 1} "
                        "without gaps (re-train it with gptforge train-tokenizer)")
    specials = {a.content for a in tok.hf.get_added_tokens_decoder().values() if a.special}
    special_ids = {vocab[s] for s in specials}
    if tok.kind == "char":
        names, merges = _char_vocab(tokens, special_ids)
    else:
        names, merges = list(tokens), _merges(tok)
    types = [_TOKEN_CONTROL if i in special_ids else _TOKEN_NORMAL for i in range(len(names))]
    return {"tokens": names, "types": types, "merges": merges, "eos": vocab[EOS], "pad": vocab.get(PAD),
            "unk": vocab.get(UNK), "im_end": vocab.get(IM_END)}


def _write_tokenizer(w, tok: Tokenizer, chat_template: str | None) -> None:
    f = tokenizer_fields(tok)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(PRE_TOKENIZER)
    w.add_token_list(f["tokens"])
    w.add_token_types(f["types"])
    # llama.cpp needs the key, but GGUF has no empty array (a char vocabulary of single bytes has no merges): then
    # one merge that never applies, as no merge makes its left part and special tokens never reach the BPE
    w.add_token_merges(f["merges"] or [f"{EOS} {EOS}"])
    w.add_bos_token_id(f["eos"])  # as export-hf: <|endoftext|> is both; never added to a prompt
    w.add_eos_token_id(f["eos"])
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    if f["pad"] is not None:
        w.add_pad_token_id(f["pad"])
    if f["unk"] is not None:
        w.add_unk_token_id(f["unk"])
    if chat_template is not None:
        w.add_chat_template(chat_template)
        if f["im_end"] is not None:
            w.add_eot_token_id(f["im_end"])  # ends an assistant turn


# ---- weights ------------------------------------------------------------------------------------
def _permute_rope(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Our rotate-half q/k rows -> llama.cpp llama's interleaved-pair RoPE (as its HF converter permutes)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(state: dict[str, torch.Tensor], cfg, n_vocab: int) -> dict[str, torch.Tensor]:
    """Our state dict -> GGUF tensor names (torch layout (out, in); the writer reverses to ggml's order),
    the vocabulary rows cut to n_vocab."""
    arch, out = gguf_arch(cfg), {}
    out["token_embd.weight"] = state["tok_emb.weight"][:n_vocab]
    if arch == "gpt2":
        out["position_embd.weight"] = state["pos_emb.weight"]
    for i in range(cfg.n_layer):
        s, b = f"layers.{i}.", f"blk.{i}."
        names = {"attn_norm": "attn_norm", "mlp_norm": "ffn_norm", "attn.o_proj": "attn_output",
                 "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
        if arch != "gpt2":
            names |= {"mlp.gate_proj": "ffn_gate", "attn.q_proj": "attn_q", "attn.k_proj": "attn_k",
                      "attn.v_proj": "attn_v"}
        if cfg.qk_norm:
            names |= {"attn.q_norm": "attn_q_norm", "attn.k_norm": "attn_k_norm"}
        for ours, theirs in names.items():
            for kind in ("weight", "bias"):
                if s + ours + "." + kind in state:
                    out[f"{b}{theirs}.{kind}"] = state[f"{s}{ours}.{kind}"]
        if arch == "gpt2":  # one fused projection, q | k | v rows
            for kind in ("weight", "bias"):
                out[f"{b}attn_qkv.{kind}"] = torch.cat([state[f"{s}attn.{n}_proj.{kind}"] for n in "qkv"], 0)
        elif arch == "llama":
            for n, heads in (("q", cfg.n_head), ("k", cfg.kv_heads)):
                for kind in ("weight", "bias"):
                    if f"{b}attn_{n}.{kind}" in out:
                        out[f"{b}attn_{n}.{kind}"] = _permute_rope(out[f"{b}attn_{n}.{kind}"], heads)
    out["output_norm.weight"] = state["norm.weight"]
    if "norm.bias" in state:
        out["output_norm.bias"] = state["norm.bias"]
    if not cfg.tie_embeddings:
        out["output.weight"] = state["lm_head.weight"][:n_vocab]
    return out


def _encode(gguf, t: torch.Tensor, qtype: str):
    """-> (array, raw ggml type or None). Vectors (norms, biases) stay f32, as llama.cpp wants; matrices take
    `qtype`, except q8_0 of rows not a multiple of its 32-value block (those become f16)."""
    a = t.detach().to(torch.float32).cpu().numpy()
    Q = gguf.GGMLQuantizationType
    if a.ndim == 1 or qtype == "f32":
        return a, None
    if qtype == "f16" or (qtype == "q8_0" and a.shape[-1] % 32):
        return a.astype(np.float16), None
    kind = Q.BF16 if qtype == "bf16" else Q.Q8_0
    return gguf.quants.quantize(a, kind), kind


def _write_hparams(w, cfg, n_vocab: int) -> None:
    w.add_context_length(cfg.block_size)
    w.add_embedding_length(cfg.d_model)
    w.add_feed_forward_length(cfg.d_ff)
    w.add_block_count(cfg.n_layer)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.kv_heads)
    w.add_vocab_size(n_vocab)
    if cfg.arch == "gpt2":
        w.add_layer_norm_eps(cfg.norm_eps)
        return
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)


_FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}  # gguf.LlamaFileType


def write_gguf(model, cfg, tok: Tokenizer, out: str | Path, qtype: str = "f32",
               chat_template: str | None = None, name: str = "gptforge") -> Path:
    """Write an in-memory GPT (plain, unwrapped) and its tokenizer as a GGUF file."""
    gguf = _gguf()
    if qtype not in TYPES:
        raise UserError(f"unknown --type '{qtype}'; use one of: {', '.join(TYPES)}")
    check_gguf_exportable(cfg)
    n_vocab = tok.vocab_size
    if n_vocab > cfg.vocab_size:
        raise UserError(f"the tokenizer has {n_vocab} tokens but the model only {cfg.vocab_size} rows; "
                        "the checkpoint and its tokenizer do not match")
    out = Path(out)
    with torch.no_grad():
        tensors = gguf_tensors(model.state_dict(), cfg, n_vocab)

    def write(tmp: Path) -> None:
        w = gguf.GGUFWriter(str(tmp), gguf_arch(cfg))
        w.add_name(name)
        w.add_file_type(_FILE_TYPES[qtype])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _write_hparams(w, cfg, n_vocab)
        _write_tokenizer(w, tok, chat_template)
        for k, t in tensors.items():
            data, raw = _encode(gguf, t, qtype)
            w.add_tensor(k, data, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    replace_file(out, write)
    return out


def export_gguf(ckpt_dir: str | Path, out: str | Path, qtype: str = "f32", force: bool = False) -> Path:
    """A gptforge checkpoint (or run dir -> its latest checkpoint) -> one GGUF file."""
    out = Path(out)
    if out.is_dir():
        raise UserError(f"--out '{out}' is a folder; give a file path such as model.gguf")
    if out.exists() and not force:
        raise UserError(f"--out '{out}' exists; choose a new file name, or pass --force to overwrite it")
    if qtype not in TYPES:
        raise UserError(f"unknown --type '{qtype}'; use one of: {', '.join(TYPES)}")
    ck = checkpoint_dir_of(ckpt_dir)
    if not (ck / "tokenizer.json").is_file():
        raise UserError(f"checkpoint '{ck}' has no tokenizer.json; a GGUF file must carry its tokenizer")
    cfg = model_config(ck)
    check_gguf_exportable(cfg)  # before spending time on loading
    tok = load_tokenizer(ck)
    model = load_checkpoint_model(ck, "cpu", cfg)  # a LoRA checkpoint: adapters merged
    return write_gguf(model, cfg, tok, out, qtype, chat_template=find_chat_template(ck), name=ck.parent.name)


@dataclass
class ExportGGUFOptions:
    """Export a checkpoint as one GGUF file (llama.cpp, Ollama, LM Studio)."""

    checkpoint: str
    """checkpoint dir, or a run's out_dir (latest checkpoint)"""
    out: str
    """output file, e.g. model.gguf"""
    type: Literal["f32", "f16", "bf16", "q8_0"] = "f16"
    """weight type of the matrices (norms and biases stay f32); q8_0: 8-bit blocks of 32"""
    force: bool = False
    """overwrite an existing --out file"""


def main(opts: ExportGGUFOptions) -> int:
    out = export_gguf(opts.checkpoint, opts.out, opts.type, force=opts.force)
    cfg = model_config(checkpoint_dir_of(opts.checkpoint))
    print(f"wrote {gguf_arch(cfg)} GGUF ({opts.type}) to {out}; run it with: llama-cli -m {out}  "
          f"(Ollama: a Modelfile with the line 'FROM ./{out.name}')")
    return 0
