"""What a model costs, from its config alone: parameters, training FLOPs per token, training memory.

The single source for the MFU in the training log, `--train.auto` and `gptforge doctor`'s advice.
Every function takes a complete `GPTConfig` (`cfg.complete()`; vocab_size set).

Memory estimate (bytes, one rank), P = parameters, s = sequence length, b = micro-batch,
h = d_model, h_kv = d_model * n_kv_head / n_head, f = d_ff, L = layers, a = heads, V = vocab,
e = bytes of an activation element (2 under bf16/fp16 autocast, 4 in fp32), r = bytes of the
residual stream (always 4: the weights, hence the residual adds, stay fp32 under autocast):

  model states   = (4 params + 4 grads + 8 AdamW m,v) * P / shard           (fp32 master weights)
                 + 4P DDP gradient buckets      when world > 1 and shard == 1 (DDP)
  weight copies  = 2P / shard autocast bf16/fp16 weights (+ 2 gathered layers under FSDP), kept until backward ends
  activations    per layer (tensors saved for backward, dropout 0, fused/flash SDPA):
                   s*b*( 2r*h            two norm inputs (RMSNorm keeps x and rstd: model.gpt._RMSNormFn on a
                                         CPU, the fused kernel elsewhere; LayerNorm x, mean and rstd)
                       + e*(2h           the two norm outputs, cast once to e by the norm and shared by the
                                         projections that read them (q, k, v; up and gate)
                          + 2h + 2h_kv   q, k, v and the attention output (input of the out-projection)
                          + m*f          MLP: GELU m=2 (fc out, gelu out), ReLU^2 m=2 (relu out, its square),
                                         SwiGLU m=4 (gate, up, silu, product)
                          + h + h_kv))   model.qk_norm: q and k as their RMSNorm keeps them (its input)
                   + 2*e*a*s*s*b        only without a fused attention kernel (scores + softmax)
                 + one layer's activations as backward working set (activation gradients)
                 with activation checkpointing: L * r*s*b*h (block inputs) + two layers' worth (recompute + grads)
                 head: s*b*h*(2r + e) + s*b*V*(e + 8)   (final norm, logits, fp32 log-softmax and its grad)
  optimizer step = 4P / shard temporaries (foreach AdamW's sqrt(v)); the step runs after backward freed
                   the activations and weight copies: peak = fp32 states + max(copies + activations,
                   step temporaries) + runtime
  runtime        = 1 GiB on a GPU (context, library workspaces), 0.3 GiB on a CPU

This is the Korthikanti et al. (2022) activation count adapted to fused attention, GQA and SwiGLU;
``tests/unit/test_hardware.py`` checks it against the bytes autograd really saves (nano and minimind, fp32 and bf16).
The fit budget leaves 12% for allocator fragmentation (``FIT_FRACTION``).
"""

from __future__ import annotations

from gptforge.model.gpt import GPTConfig

GiB = 1024**3


def layer_params(c: GPTConfig) -> int:
    """Parameters of one transformer block."""
    h, f, h_kv = c.d_model, c.d_ff, c.head_dim * c.kv_heads
    attn = h * (h + 2 * h_kv) + h * h
    gated = c.activation == "swiglu"  # gate, up, down; gelu and relu2: up, down
    mlp = (3 if gated else 2) * h * f
    norms = 2 * h if c.arch == "llama" else (4 if c.bias else 2) * h
    if c.qk_norm:
        norms += 2 * c.head_dim
    if c.bias:
        attn += h + 2 * h_kv + h
        mlp += (2 * f if gated else f) + h
    return attn + mlp + norms


def count_params(c: GPTConfig) -> int:
    """All parameters, tied weights once (equals GPT(c).num_params())."""
    h, V = c.d_model, c.vocab_size
    pos = c.block_size * h if c.arch == "gpt2" else 0
    final_norm = (2 if c.bias else 1) * h if c.arch == "gpt2" else h
    head = 0 if c.tie_embeddings else V * h
    return V * h + pos + c.n_layer * layer_params(c) + final_norm + head


def flops_per_token(c: GPTConfig, seq_len: int | None = None) -> float:
    """Training FLOPs per token (forward + backward): 6 x (matmul parameters, the LM head included)
    + 12 x layers x d_model x sequence length (attention scores and values)."""
    T = seq_len or c.block_size
    return 6.0 * (c.n_layer * layer_params(c) + c.vocab_size * c.d_model) + 12.0 * c.n_layer * c.d_model * T


def elem_bytes(precision: str) -> int:
    if precision in ("bf16", "fp16"):
        return 2
    if precision == "fp32":
        return 4
    raise ValueError(f"unknown precision {precision!r} (use fp32, bf16 or fp16)")


def activation_bytes(c: GPTConfig, micro_batch: int, seq_len: int, precision: str = "bf16",
                     activation_checkpointing: bool = False, flash: bool = True) -> int:
    """Bytes of the tensors autograd keeps for backward (see the module docstring)."""
    e, r = elem_bytes(precision), 4
    h, h_kv = c.d_model, c.head_dim * c.kv_heads
    sb = seq_len * micro_batch
    gated = c.activation == "swiglu"
    m = 4 if gated else 2
    norms = 2 * r * h  # each norm keeps its fp32 input (and a per-row rstd)
    casts = 2 * h  # each norm's output, cast once to the activation dtype and shared by its projections
    qk = (h + h_kv) if c.qk_norm else 0  # q and k as their HeadNorm keeps them, in the activation dtype
    per_layer = sb * (norms + e * (casts + qk + 2 * h + 2 * h_kv + m * c.d_ff))
    if not flash:
        per_layer += 2 * e * c.n_head * seq_len * seq_len * micro_batch
    # + one layer's worth of working memory in backward (activation gradients, recomputation)
    if activation_checkpointing:
        layers = c.n_layer * r * sb * h + 2 * per_layer
    else:
        layers = (c.n_layer + 1) * per_layer
    head = sb * h * (2 * r + e) + sb * c.vocab_size * (e + 8)
    return int(layers + head)


def memory_breakdown(c: GPTConfig, micro_batch: int, seq_len: int, precision: str = "bf16",
                     activation_checkpointing: bool = False, optimizer: str = "adamw", world_size: int = 1,
                     shard: int = 1, device: str = "cuda", flash: bool = True) -> dict[str, int]:
    """Predicted peak training memory of one rank in bytes, by part; "total" is the sum."""
    P = count_params(c)
    shard = max(1, int(shard))
    opt_states = {"adamw": 8, "adam": 8, "sgd": 4, "lion": 4}.get(optimizer.lower(), 8)
    half = elem_bytes(precision) == 2
    parts = {
        "params": 4 * P // shard,
        "grads": 4 * P // shard,
        "optimizer": opt_states * P // shard,
        "ddp_buckets": 4 * P if (world_size > 1 and shard == 1) else 0,
        "half_weights": (2 * P // shard + (4 * layer_params(c) if shard > 1 else 0)) if half else 0,
    }
    acts = activation_bytes(c, micro_batch, seq_len, precision, activation_checkpointing, flash)
    parts["activations"] = acts
    # the optimizer step runs after backward has freed activations and autocast weight copies
    parts["transient"] = max(0, 4 * P // shard - acts - parts["half_weights"])
    parts["runtime"] = GiB if device in ("cuda", "rocm", "gpu") else int(0.3 * GiB)
    parts["total"] = sum(parts.values())
    return parts


def estimate_memory(c: GPTConfig, micro_batch: int, seq_len: int, precision: str = "bf16", **kw) -> int:
    """Predicted peak training memory of one rank in bytes (memory_breakdown's total)."""
    return memory_breakdown(c, micro_batch, seq_len, precision, **kw)["total"]
