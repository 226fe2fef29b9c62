"""Our GPT <-> Hugging Face GPT-2 / Llama / Qwen3: the one translation of configs and weights, used by
export-hf (ours -> HF) and by HF import / --init-from (HF -> ours).

arch "gpt2"  <-> GPT2LMHeadModel: Conv1D layers (weights stored transposed, (in, out)) and one fused
               c_attn = concat(q, k, v); needs bias=True and no grouped-query attention.
arch "llama" <-> LlamaForCausalLM: q/k/v/o_proj, gate/up/down_proj, RMSNorm; RoPE rotate-half, as ours.
arch "llama" + model.qk_norm <-> Qwen3ForCausalLM: Llama's layout plus q_norm/k_norm (RMSNorm over head_dim
               after the projection, before RoPE, as ours); no biases (Qwen3's MLP has none), no sliding window.
Block options with no transformers counterpart (a non-default model.mlp_act, model.logit_softcap, qk_norm on
arch gpt2) refuse export in check_exportable; model.zero_init_proj is only an initialisation and exports.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gptforge.errors import UserError
from gptforge.model.gpt import GPTConfig

SUPPORTED = ("gpt2", "llama", "qwen3")
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
# buffers older transformers saved with the weights: not parameters, recomputed by our model
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")
# tie_word_embeddings when config.json leaves it out: each transformers config class's own default (GPT2Config
# ties; LlamaConfig and Qwen3Config do not), checked against the installed transformers by tests/unit/test_hf_tie.py
TIE_DEFAULT = {"gpt2": True, "llama": False, "qwen3": False}


# ---- the name map -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    """One Hugging Face tensor = our tensor(s) `ours` concatenated along dim 0, transposed if `transpose`."""

    hf: str
    ours: tuple[str, ...]
    transpose: bool = False


def name_map(cfg) -> list[Entry]:
    """Every tensor of the model `cfg`, our names <-> Hugging Face names and layouts."""
    out: list[Entry] = []
    if cfg.arch == "gpt2":
        p = "transformer."
        out += [Entry(p + "wte.weight", ("tok_emb.weight",)), Entry(p + "wpe.weight", ("pos_emb.weight",))]
        for i in range(cfg.n_layer):
            s, h = f"layers.{i}.", f"{p}h.{i}."
            qkv = tuple(f"{s}attn.{n}_proj" for n in "qkv")  # fused into one Conv1D
            for ours, theirs, conv in (("attn_norm", "ln_1", False), ("mlp_norm", "ln_2", False),
                                       (qkv, "attn.c_attn", True), ("attn.o_proj", "attn.c_proj", True),
                                       ("mlp.up_proj", "mlp.c_fc", True), ("mlp.down_proj", "mlp.c_proj", True)):
                names = ours if isinstance(ours, tuple) else (s + ours,)
                out += [Entry(f"{h}{theirs}.{k}", tuple(f"{n}.{k}" for n in names), conv and k == "weight")
                        for k in ("weight", "bias")]
        out += [Entry(p + "ln_f.weight", ("norm.weight",)), Entry(p + "ln_f.bias", ("norm.bias",))]
    else:
        p = "model."
        out.append(Entry(p + "embed_tokens.weight", ("tok_emb.weight",)))
        names = [("attn_norm", "input_layernorm", False), ("mlp_norm", "post_attention_layernorm", False)]
        names += [(f"attn.{n}_proj", f"self_attn.{n}_proj", True) for n in "qkvo"]
        names += [(f"mlp.{n}_proj", f"mlp.{n}_proj", True) for n in ("gate", "up", "down")]
        if cfg.qk_norm:  # Qwen3
            names += [(f"attn.{n}_norm", f"self_attn.{n}_norm", False) for n in "qk"]
        for i in range(cfg.n_layer):
            for ours, theirs, linear in names:
                kinds = ("weight", "bias") if linear and cfg.bias else ("weight",)
                out += [Entry(f"{p}layers.{i}.{theirs}.{k}", (f"layers.{i}.{ours}.{k}",)) for k in kinds]
        out.append(Entry(p + "norm.weight", ("norm.weight",)))
    if not cfg.tie_embeddings:
        out.append(Entry("lm_head.weight", ("lm_head.weight",)))
    return out


def to_hf_state_dict(state: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    """Our state dict (names as in gptforge.model.gpt.GPT) -> Hugging Face names and layouts."""
    check_exportable(cfg)
    out: dict[str, torch.Tensor] = {}
    for e in name_map(cfg):
        parts = [state[k].detach() for k in e.ours]
        t = parts[0] if len(parts) == 1 else torch.cat(parts, 0)
        out[e.hf] = t.t() if e.transpose else t
    return out


def from_hf_state_dict(hf: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    """Hugging Face names and layouts -> ours (the inverse of to_hf_state_dict). Strict: every tensor is
    used, every parameter found."""
    src = dict(hf)
    if cfg.arch == "gpt2":  # the hub's gpt2 stores keys without the "transformer." prefix
        src = {(k if k == "lm_head.weight" or k.startswith("transformer.") else "transformer." + k): v
               for k, v in src.items()}
    used: set[str] = set()
    sd: dict[str, torch.Tensor] = {}
    for e in name_map(cfg):
        if e.hf == "lm_head.weight" and e.hf not in src:
            raise UserError("Hugging Face weights lack lm_head.weight, but config.json says the output head is "
                            "untied (tie_word_embeddings false, or absent: transformers' default for "
                            f"{cfg.arch}); set tie_word_embeddings to true if the head is the embedding")
        if e.hf not in src:
            raise UserError(f"Hugging Face weights lack '{e.hf}' expected for this {cfg.arch} config; "
                            "the folder's config.json and weights do not match")
        used.add(e.hf)
        t = src[e.hf].t() if e.transpose else src[e.hf]
        if len(e.ours) == 1:
            sd[e.ours[0]] = t.contiguous() if e.transpose else t
        else:
            sd.update(zip(e.ours, (c.contiguous() for c in t.chunk(len(e.ours), 0))))
    if cfg.tie_embeddings:
        head = src.get("lm_head.weight")  # some tied checkpoints store it anyway: then it must equal the embedding
        if head is not None and not (head.shape == sd["tok_emb.weight"].shape  # meta tensors: shapes only
                                     and (head.is_meta or torch.equal(head, sd["tok_emb.weight"]))):
            raise UserError("Hugging Face weights hold an lm_head.weight that differs from the embedding, but "
                            "config.json says tie_word_embeddings=true; set it to false if the model has its own "
                            "output head, or remove lm_head.weight")
        used.add("lm_head.weight")
        sd["lm_head.weight"] = sd["tok_emb.weight"]
    extra = [k for k in src if k not in used and not k.endswith(_IGNORED_SUFFIXES)]
    if extra:
        raise UserError(f"Hugging Face weights hold {len(extra)} tensor(s) this {cfg.arch} config does not use "
                        f"(e.g. '{extra[0]}'); the folder's config.json and weights do not match")
    return sd


# ---- configs ------------------------------------------------------------------------------------
def check_exportable(cfg) -> None:
    """Raise UserError when our model has no exact Hugging Face counterpart (one line naming the key)."""
    if cfg.logit_softcap:
        raise UserError(f"this model has model.logit_softcap={cfg.logit_softcap:g}, which Hugging Face GPT-2, "
                        "Llama and Qwen3 do not apply; only models trained with model.logit_softcap=0 export")
    want = {"gpt2": "gelu", "llama": "swiglu"}.get(cfg.arch)
    if want is not None and cfg.activation != want:
        raise UserError(f"this {cfg.arch}-style model has model.mlp_act={cfg.mlp_act}, but the Hugging Face "
                        f"{'GPT-2' if cfg.arch == 'gpt2' else 'Llama/Qwen3'} MLP is {want}; only models trained "
                        f"with model.mlp_act=auto ({want}) export")
    if cfg.qk_norm and cfg.arch == "gpt2":
        raise UserError("this gpt2-style model has model.qk_norm=true, which GPT2LMHeadModel cannot express; "
                        "train with model.arch=llama (exports as Qwen3) or model.qk_norm=false to export")
    if cfg.qk_norm and cfg.bias:
        raise UserError("this model has model.qk_norm=true with model.bias=true, but Qwen3's MLP has no biases; "
                        "only qk_norm models trained with model.bias=false export (as Qwen3)")
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
    llama = {"max_position_embeddings": cfg.block_size, "hidden_size": cfg.d_model,
             "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layer,
             "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_kv_head,
             "head_dim": cfg.head_dim, "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps,
             "rope_theta": cfg.rope_theta,  # transformers 4.x
             "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},  # 5.x
             "rope_scaling": None, "attention_bias": bool(cfg.bias), "attention_dropout": cfg.dropout}
    if cfg.qk_norm:  # every layer full attention: no sliding window
        return {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", **llama,
                "use_sliding_window": False, "sliding_window": None, "max_window_layers": cfg.n_layer,
                "layer_types": ["full_attention"] * cfg.n_layer} | common
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **llama,
            "mlp_bias": bool(cfg.bias), "pretraining_tp": 1} | common


def gpt_config_from_hf(conf: dict, vocab_size: int | None = None) -> GPTConfig:
    """Hugging Face config dict -> our GPTConfig (exactly the same model)."""
    mt = conf.get("model_type")
    if mt not in SUPPORTED:
        raise UserError(f"unsupported Hugging Face model_type '{mt}'; gptforge converts: {', '.join(SUPPORTED)} "
                        "(GPT-2 family such as gpt2/distilgpt2, Llama family such as TinyLlama, Qwen3 with "
                        "head_dim = hidden_size / heads)")
    tie = conf.get("tie_word_embeddings")
    tie = TIE_DEFAULT[mt] if tie is None else bool(tie)  # absent: transformers' default for this model_type
    V = int(vocab_size or conf["vocab_size"])
    try:
        return _gpt2_config(conf, V, tie) if mt == "gpt2" else _llama_config(conf, V, tie, qwen3=mt == "qwen3")
    except KeyError as e:
        raise UserError(f"Hugging Face {mt} config is missing the field {e}; re-download the model") from None


def _gpt2_config(conf: dict, V: int, tie: bool) -> GPTConfig:
    act = conf.get("activation_function", "gelu_new")
    if act not in _TANH_GELU:
        raise UserError(f"GPT-2 model with activation_function '{act}': gptforge's GPT-2 MLP is tanh-GELU "
                        f"({', '.join(_TANH_GELU)}); this model cannot be converted exactly")
    if conf.get("scale_attn_by_inverse_layer_idx") or conf.get("scale_attn_weights", True) is False:
        raise UserError("GPT-2 model with non-standard attention scaling (scale_attn_by_inverse_layer_idx "
                        "or scale_attn_weights=false) cannot be converted")
    d = int(conf["n_embd"])
    return GPTConfig(arch="gpt2", vocab_size=V, block_size=int(conf.get("n_positions") or conf["n_ctx"]),
                     n_layer=int(conf["n_layer"]), n_head=int(conf["n_head"]), n_kv_head=int(conf["n_head"]), d_model=d,
                     d_ff=int(conf.get("n_inner") or 4 * d), dropout=0.0, bias=True, tie_embeddings=tie,
                     norm_eps=float(conf.get("layer_norm_epsilon", 1e-5)),
                     init_std=float(conf.get("initializer_range", 0.02)))


def _llama_config(conf: dict, V: int, tie: bool, qwen3: bool = False) -> GPTConfig:
    """Llama, or Qwen3 (= Llama + q/k norms, attention biases only, optional sliding window)."""
    name = "Qwen3" if qwen3 else "Llama"
    if conf.get("hidden_act", "silu") != "silu":
        raise UserError(f"{name} model with hidden_act '{conf['hidden_act']}'; only silu (SwiGLU) converts")
    if qwen3 and conf.get("use_sliding_window"):
        raise UserError("Qwen3 model with use_sliding_window=true; gptforge has full attention only")
    rp = conf.get("rope_parameters") or conf.get("rope_scaling") or {}
    rope_type = rp.get("rope_type", rp.get("type", "default")) if isinstance(rp, dict) else "default"
    if rope_type not in ("default", None):
        raise UserError(f"{name} model with rope scaling '{rope_type}'; gptforge supports plain RoPE only")
    theta = (rp.get("rope_theta") if isinstance(rp, dict) else None) or conf.get("rope_theta", 10000.0)
    d, nh = int(conf["hidden_size"]), int(conf["num_attention_heads"])
    if conf.get("head_dim") not in (None, d // nh):
        raise UserError(f"{name} model with head_dim={conf['head_dim']} != hidden_size/num_attention_heads="
                        f"{d // nh}; gptforge cannot express it")
    ab, mb = bool(conf.get("attention_bias", False)), bool(conf.get("mlp_bias", False))
    if qwen3 and ab:
        raise UserError("Qwen3 model with attention_bias=true (its MLP has none); gptforge has one bias switch "
                        "for both")
    if ab != mb:
        raise UserError(f"Llama model with attention_bias={ab} but mlp_bias={mb}; gptforge has one bias "
                        "switch for both")
    return GPTConfig(arch="llama", vocab_size=V, block_size=int(conf.get("max_position_embeddings", 2048)),
                     n_layer=int(conf["num_hidden_layers"]), n_head=nh,
                     n_kv_head=int(conf.get("num_key_value_heads") or nh), d_model=d,
                     d_ff=int(conf["intermediate_size"]), dropout=0.0, bias=ab, tie_embeddings=tie,
                     norm_eps=float(conf.get("rms_norm_eps", 1e-6)), rope_theta=float(theta),
                     init_std=float(conf.get("initializer_range", 0.02)), qk_norm=qwen3)
