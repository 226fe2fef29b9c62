"""Load a local Hugging Face model folder (GPT-2 or Llama family) as our GPT: the inverse of export-hf.

    model, cfg, tok = load_hf("path/to/distilgpt2")

Reads config.json and safetensors only (model.safetensors, or shards with model.safetensors.index.json);
PyTorch pickles (pytorch_model.bin, *.pt) are refused, since unpickling can run code.
Supported: model_type "gpt2" (gpt2, distilgpt2, our own exports) and "llama" (TinyLlama, our exports).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from gptforge.errors import UserError

SUPPORTED = ("gpt2", "llama")
_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
_PICKLES = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
# buffers older transformers saved with the weights: not parameters, recomputed by our model
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


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


def gpt_config_from_hf(conf: dict, vocab_size: int | None = None):
    """Hugging Face config dict -> our GPTConfig (exactly the same model)."""
    from gptforge.model.gpt import GPTConfig

    mt = conf.get("model_type")
    if mt not in SUPPORTED:
        raise UserError(f"unsupported Hugging Face model_type '{mt}'; gptforge converts: {', '.join(SUPPORTED)} "
                        "(GPT-2 family such as gpt2/distilgpt2, Llama family such as TinyLlama)")
    tie = bool(conf.get("tie_word_embeddings", True))
    V = int(vocab_size or conf["vocab_size"])
    try:
        if mt == "gpt2":
            act = conf.get("activation_function", "gelu_new")
            if act not in _TANH_GELU:
                raise UserError(f"GPT-2 model with activation_function '{act}': gptforge's GPT-2 MLP is tanh-GELU "
                                f"({', '.join(_TANH_GELU)}); this model cannot be converted exactly")
            if conf.get("scale_attn_by_inverse_layer_idx") or conf.get("scale_attn_weights", True) is False:
                raise UserError("GPT-2 model with non-standard attention scaling (scale_attn_by_inverse_layer_idx "
                                "or scale_attn_weights=false) cannot be converted")
            d = int(conf["n_embd"])
            return GPTConfig(arch="gpt2", vocab_size=V, block_size=int(conf.get("n_positions") or conf["n_ctx"]),
                             n_layer=int(conf["n_layer"]), n_head=int(conf["n_head"]), d_model=d,
                             d_ff=int(conf.get("n_inner") or 4 * d), dropout=0.0, bias=True, tie_embeddings=tie,
                             norm_eps=float(conf.get("layer_norm_epsilon", 1e-5)),
                             init_std=float(conf.get("initializer_range", 0.02)))
        # llama
        if conf.get("hidden_act", "silu") != "silu":
            raise UserError(f"Llama model with hidden_act '{conf['hidden_act']}'; only silu (SwiGLU) converts")
        rp = conf.get("rope_parameters") or conf.get("rope_scaling") or {}
        rope_type = rp.get("rope_type", rp.get("type", "default")) if isinstance(rp, dict) else "default"
        if rope_type not in ("default", None):
            raise UserError(f"Llama model with rope scaling '{rope_type}'; gptforge supports plain RoPE only")
        theta = (rp.get("rope_theta") if isinstance(rp, dict) else None) or conf.get("rope_theta", 10000.0)
        d, nh = int(conf["hidden_size"]), int(conf["num_attention_heads"])
        if conf.get("head_dim") not in (None, d // nh):
            raise UserError(f"Llama model with head_dim={conf['head_dim']} != hidden_size/num_attention_heads="
                            f"{d // nh}; gptforge cannot express it")
        ab, mb = bool(conf.get("attention_bias", False)), bool(conf.get("mlp_bias", False))
        if ab != mb:
            raise UserError(f"Llama model with attention_bias={ab} but mlp_bias={mb}; gptforge has one bias "
                            "switch for both")
        return GPTConfig(arch="llama", vocab_size=V, block_size=int(conf.get("max_position_embeddings", 2048)),
                         n_layer=int(conf["num_hidden_layers"]), n_head=nh,
                         n_kv_head=int(conf.get("num_key_value_heads") or nh), d_model=d,
                         d_ff=int(conf["intermediate_size"]), dropout=0.0, bias=ab, tie_embeddings=tie,
                         norm_eps=float(conf.get("rms_norm_eps", 1e-6)), rope_theta=float(theta),
                         init_std=float(conf.get("initializer_range", 0.02)))
    except KeyError as e:
        raise UserError(f"Hugging Face {mt} config is missing the field {e}; re-download the model") from None


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
    from safetensors import safe_open

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


def from_hf_state_dict(hf: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    """Hugging Face names and layouts -> ours (inverse of hf_export.to_hf_state_dict). Strict: every
    tensor is used, every parameter found."""
    used: set[str] = set()
    src = dict(hf)
    if cfg.arch == "gpt2":  # the hub's gpt2 stores keys without the "transformer." prefix
        src = {(k if k == "lm_head.weight" or k.startswith("transformer.") else "transformer." + k): v
               for k, v in src.items()}

    def take(key: str) -> torch.Tensor:
        if key not in src:
            raise UserError(f"Hugging Face weights lack '{key}' expected for this {cfg.arch} config; "
                            "the folder's config.json and weights do not match")
        used.add(key)
        return src[key]

    sd: dict[str, torch.Tensor] = {}
    D = cfg.d_model
    if cfg.arch == "gpt2":
        p = "transformer."
        sd["tok_emb.weight"] = take(p + "wte.weight")
        sd["pos_emb.weight"] = take(p + "wpe.weight")
        for i in range(cfg.n_layer):
            s, h = f"layers.{i}.", f"{p}h.{i}."
            for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
                sd[s + ours + ".weight"] = take(h + theirs + ".weight")
                sd[s + ours + ".bias"] = take(h + theirs + ".bias")
            w = take(h + "attn.c_attn.weight").t()  # (3D, D)
            b = take(h + "attn.c_attn.bias")
            for j, n in enumerate("qkv"):
                sd[f"{s}attn.{n}_proj.weight"] = w[j * D:(j + 1) * D].contiguous()
                sd[f"{s}attn.{n}_proj.bias"] = b[j * D:(j + 1) * D].contiguous()
            for ours, theirs in (("attn.o_proj", "attn.c_proj"), ("mlp.up_proj", "mlp.c_fc"),
                                 ("mlp.down_proj", "mlp.c_proj")):
                sd[s + ours + ".weight"] = take(h + theirs + ".weight").t().contiguous()
                sd[s + ours + ".bias"] = take(h + theirs + ".bias")
        sd["norm.weight"] = take(p + "ln_f.weight")
        sd["norm.bias"] = take(p + "ln_f.bias")
    else:
        p = "model."
        sd["tok_emb.weight"] = take(p + "embed_tokens.weight")
        names = [("attn_norm", "input_layernorm", False), ("mlp_norm", "post_attention_layernorm", False)]
        names += [(f"attn.{n}_proj", f"self_attn.{n}_proj", True) for n in "qkvo"]
        names += [(f"mlp.{n}_proj", f"mlp.{n}_proj", True) for n in ("gate", "up", "down")]
        for i in range(cfg.n_layer):
            for ours, theirs, linear in names:
                sd[f"layers.{i}.{ours}.weight"] = take(f"{p}layers.{i}.{theirs}.weight")
                if linear and cfg.bias:
                    sd[f"layers.{i}.{ours}.bias"] = take(f"{p}layers.{i}.{theirs}.bias")
        sd["norm.weight"] = take(p + "norm.weight")
    if cfg.tie_embeddings:
        used.add("lm_head.weight")  # some tied checkpoints store it anyway: it equals the embedding
        sd["lm_head.weight"] = sd["tok_emb.weight"]
    else:
        sd["lm_head.weight"] = take("lm_head.weight")
    extra = [k for k in src if k not in used and not k.endswith(_IGNORED_SUFFIXES)]
    if extra:
        raise UserError(f"Hugging Face weights hold {len(extra)} tensor(s) this {cfg.arch} config does not use "
                        f"(e.g. '{extra[0]}'); the folder's config.json and weights do not match")
    return sd


def hf_tokenizer(folder: str | Path):
    """Our Tokenizer from a Hugging Face folder (tokenizer.json, or GPT-2's vocab.json + merges.txt);
    None when it has neither."""
    from gptforge.data.tokenizer import Tokenizer, load_tokenizer

    p = Path(folder)
    if (p / "tokenizer.json").is_file():
        return load_tokenizer(p)
    if (p / "vocab.json").is_file() and (p / "merges.txt").is_file():
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers

        hf = HFTokenizer(models.BPE.from_file(str(p / "vocab.json"), str(p / "merges.txt")))
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        return Tokenizer(hf, "bpe")
    return None


def load_hf(folder: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
            with_tokenizer: bool = True):
    """A local Hugging Face folder -> (GPT in eval mode, GPTConfig, our Tokenizer or None)."""
    from gptforge.model.gpt import GPT, rope_cache

    p = Path(folder)
    if not p.is_dir():
        raise UserError(f"Hugging Face model folder '{p}' does not exist")
    conf = read_hf_config(p)
    cfg = gpt_config_from_hf(conf)
    files = weight_files(p)
    sd = from_hf_state_dict(read_safetensors(files, dtype), cfg)
    _check_shapes(sd, cfg)
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device=device)
    if cfg.tie_embeddings:  # to_empty unties parameters
        model.lm_head.weight = model.tok_emb.weight
    model.load_state_dict(sd, strict=True)
    if cfg.arch == "llama":  # non-persistent buffers are not in the state dict
        model.rope_cos, model.rope_sin = rope_cache(cfg, device=model.tok_emb.weight.device)
    model.to(dtype).eval()
    tok = hf_tokenizer(p) if with_tokenizer else None
    return model, cfg, tok


def _check_shapes(sd: dict[str, torch.Tensor], cfg) -> None:
    from gptforge.model.gpt import GPT

    with torch.device("meta"):
        ref = GPT(cfg).state_dict()
    for k, v in ref.items():
        if k in sd and tuple(sd[k].shape) != tuple(v.shape):
            raise UserError(f"Hugging Face tensor for '{k}' has shape {tuple(sd[k].shape)} but the config says "
                            f"{tuple(v.shape)}; the folder's config.json and weights do not match")
