"""Hardware detection, a training-memory estimate, and batch/precision auto-configuration.

``detect()`` describes the accelerator (CUDA / ROCm / CPU); ``apply_hsa_override()`` sets
``HSA_OVERRIDE_GFX_VERSION`` for consumer AMD cards whose PyTorch build needs it;
``estimate_memory()`` predicts the peak training memory of one rank; ``auto_config()`` picks
micro-batch, gradient accumulation, precision and activation checkpointing from it.

Memory estimate (bytes, one rank), P = parameters, s = sequence length, b = micro-batch,
h = d_model, h_kv = d_model * n_kv_head / n_head, f = d_ff, L = layers, a = heads, V = vocab,
e = bytes of an activation element (2 under bf16/fp16 autocast, 4 in fp32), r = bytes of the
residual stream (always 4: the weights, hence the residual adds, stay fp32 under autocast):

  model states   = (4 params + 4 grads + 8 AdamW m,v) * P / shard           (fp32 master weights)
                 + 4P DDP gradient buckets      when world > 1 and shard == 1 (DDP)
  weight copies  = 2P / shard autocast bf16/fp16 weights (+ 2 gathered layers under FSDP), kept until backward ends
  activations    per layer (tensors saved for backward, dropout 0, fused/flash SDPA):
                   s*b*( 2r*h            two norm inputs (Llama's RMSNorm: 4r*h, it keeps x and x*rstd)
                       + e*(c*h          norm outputs as the projections save them: c=2 in fp32; under
                                         autocast each projection keeps its own cast, c=3+1 (GPT-2), 3+2 (Llama)
                          + 2h + 2h_kv   q, k, v and the attention output (input of the out-projection)
                          + m*f))        MLP: GELU m=2 (fc out, gelu out), SwiGLU m=4 (gate, up, silu, product)
                   + 2*e*a*s*s*b        only without a fused attention kernel (scores + softmax)
                 + one layer's activations as backward working set (activation gradients)
                 with activation checkpointing: L * r*s*b*h (block inputs) + two layers' worth (recompute + grads)
                 head: s*b*h*(2r + e) + s*b*V*(e + 8)   (final norm, logits, fp32 log-softmax and its grad)
  optimizer step = 4P / shard temporaries (foreach AdamW's sqrt(v)); the step runs after backward freed
                   the activations and weight copies: peak = fp32 states + max(copies + activations,
                   step temporaries) + runtime
  runtime        = 1 GiB on a GPU (context, library workspaces), 0.3 GiB on a CPU

This is the Korthikanti et al. (2022) activation count adapted to fused attention, GQA and SwiGLU;
``tests/unit/test_hardware.py`` checks it against the bytes autograd really saves for the nano model.
The fit budget leaves 12% for allocator fragmentation (``FIT_FRACTION``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any, Mapping

GiB = 1024**3
FIT_FRACTION = 0.88

# HSA_OVERRIDE_GFX_VERSION for consumer RDNA cards (what the ROCm community uses). Cards that the
# PyTorch ROCm wheels support natively (gfx1030, gfx1100, data-centre gfx90a/gfx942/gfx950) need none.
HSA_OVERRIDES: dict[str, str] = {
    # RDNA2 consumer chips without kernels of their own -> run the gfx1030 code
    "gfx1031": "10.3.0", "gfx1032": "10.3.0", "gfx1033": "10.3.0", "gfx1034": "10.3.0",
    "gfx1035": "10.3.0", "gfx1036": "10.3.0",
    # RDNA3 Navi 32/33 and Phoenix APUs -> the gfx1100 code
    "gfx1101": "11.0.0", "gfx1102": "11.0.0", "gfx1103": "11.0.0", "gfx1150": "11.0.0",
    "gfx1151": "11.5.1",
    # RDNA4 (RX 9060/9070, Radeon AI PRO R9700): the runtime in many images needs the version spelled out
    "gfx1200": "12.0.0", "gfx1201": "12.0.1",
}

# Peak dense bf16/fp16 tensor TFLOPS by name fragment (rough; used only to estimate step time).
TFLOPS_TABLE: list[tuple[str, float]] = [
    ("h200", 989.0), ("h100 pcie", 756.0), ("h100", 989.0), ("gh200", 989.0), ("b200", 2250.0),
    ("a100", 312.0), ("a6000", 155.0), ("l40s", 362.0), ("l4", 121.0), ("a10", 125.0),
    ("4090", 165.0), ("4080", 97.0), ("3090", 71.0), ("v100", 125.0), ("t4", 65.0),
    ("mi300x", 1307.0), ("mi325x", 1307.0), ("mi250", 362.0), ("mi210", 181.0),
    ("r9700", 191.0), ("9700", 191.0), ("9070", 195.0), ("7900 xtx", 123.0), ("7900", 123.0),
]
CPU_TFLOPS_PER_CORE = 0.05  # fp32 GEMM on a modern x86 core, roughly


@dataclasses.dataclass
class DeviceInfo:
    vendor: str  # "cuda" | "rocm" | "cpu"
    name: str
    memory: int  # bytes per device
    arch: str = ""  # "sm_90", "gfx1201", "" for CPU
    bf16: bool = False
    count: int = 1
    tflops: float | None = None  # peak dense bf16 TFLOPS per device, if known

    @property
    def is_gpu(self) -> bool:
        return self.vendor in ("cuda", "rocm")

    def describe(self) -> str:
        arch = f" {self.arch}" if self.arch else ""
        n = f"{self.count}x " if self.count > 1 else ""
        return f"{n}{self.name}{arch} ({self.vendor}, {self.memory / GiB:.0f} GiB, bf16 {'yes' if self.bf16 else 'no'})"


def peak_tflops(name: str, vendor: str = "cuda", cpu_cores: int | None = None) -> float | None:
    low = name.lower()
    if vendor == "cpu":
        return CPU_TFLOPS_PER_CORE * (cpu_cores or os.cpu_count() or 1)
    for frag, tf in TFLOPS_TABLE:
        if frag in low:
            return tf
    return None


def _cpu_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 * GiB


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "CPU"


def cpu_bf16_supported() -> bool:
    """bf16 autocast on CPU is only worth it with native bf16 instructions (AVX512-BF16 / AMX)."""
    try:
        import torch

        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:
        return False


def gfx_name(target_version: int) -> str:
    """KFD ``gfx_target_version`` (major*10000 + minor*100 + stepping) -> 'gfx1201', 'gfx90a', 'gfx942'."""
    major, minor, step = target_version // 10000, (target_version // 100) % 100, target_version % 100
    return f"gfx{major}{minor:x}{step:x}"


def rocm_arch_from_kfd(root: str = "/sys/class/kfd/kfd/topology/nodes") -> str | None:
    """The gfx name of the first AMD GPU from the KFD topology, without initialising HIP (no GPU context)."""
    try:
        nodes = sorted(os.listdir(root), key=lambda x: int(x) if x.isdigit() else 0)
    except OSError:
        return None
    for n in nodes:
        try:
            with open(os.path.join(root, n, "properties")) as f:
                for line in f:
                    k, _, v = line.partition(" ")
                    if k == "gfx_target_version" and v.strip().isdigit() and int(v) > 0:
                        return gfx_name(int(v))
        except OSError:
            continue
    return None


def detect() -> DeviceInfo:
    """Describe the visible accelerator (device 0 and the count), or the CPU."""
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        props = torch.cuda.get_device_properties(0)
        rocm = getattr(torch.version, "hip", None) is not None
        if rocm:
            arch = (getattr(props, "gcnArchName", "") or "").split(":")[0]
        else:
            arch = f"sm_{props.major}{props.minor}"
        try:
            bf16 = bool(torch.cuda.is_bf16_supported())
        except Exception:
            bf16 = False
        return DeviceInfo("rocm" if rocm else "cuda", props.name, int(props.total_memory), arch, bf16,
                          torch.cuda.device_count(), peak_tflops(props.name))
    name = _cpu_name()
    return DeviceInfo("cpu", name, _cpu_memory(), "", cpu_bf16_supported(), 1, peak_tflops(name, "cpu"))


def hsa_override(arch: str) -> str | None:
    """The HSA_OVERRIDE_GFX_VERSION value a consumer RDNA card needs, or None."""
    return HSA_OVERRIDES.get(arch.split(":")[0].strip().lower()) if arch else None


def apply_hsa_override(arch: str, environ: dict | None = None) -> str | None:
    """Set HSA_OVERRIDE_GFX_VERSION for ``arch`` unless the user already set it. Returns the value in force.

    Must run before the HIP runtime initialises (before the first CUDA/HIP call in the process):
    set it in the environment of the training processes (``gptforge launch`` does).
    """
    env = os.environ if environ is None else environ
    if env.get("HSA_OVERRIDE_GFX_VERSION"):
        return env["HSA_OVERRIDE_GFX_VERSION"]
    val = hsa_override(arch)
    if val:
        env["HSA_OVERRIDE_GFX_VERSION"] = val
    return val


# ----------------------------------------------------------------------------------------------------
# model shape helpers


def _get(cfg: Any, key: str, default=None):
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


@dataclasses.dataclass
class Shape:
    arch: str
    L: int
    h: int
    a: int
    a_kv: int
    f: int
    V: int
    block_size: int
    tied: bool
    bias: bool

    @property
    def h_kv(self) -> int:
        return self.h * self.a_kv // self.a


def model_shape(model_cfg: Any) -> Shape:
    """Accept a preset name, a MODEL_PRESETS-style dict, or a config object with the same fields."""
    if isinstance(model_cfg, str):
        from gptforge.config.presets import MODEL_PRESETS

        model_cfg = MODEL_PRESETS[model_cfg]
    arch = _get(model_cfg, "arch", "gpt2") or "gpt2"
    h = int(_get(model_cfg, "d_model"))
    a = int(_get(model_cfg, "n_head"))
    a_kv = int(_get(model_cfg, "n_kv_head", None) or a)
    f = _get(model_cfg, "d_ff", None) or 4 * h
    bias = _get(model_cfg, "bias", None)
    return Shape(arch, int(_get(model_cfg, "n_layer")), h, a, a_kv, int(f), int(_get(model_cfg, "vocab_size")),
                 int(_get(model_cfg, "block_size", 1024) or 1024), bool(_get(model_cfg, "tie_embeddings", True)),
                 (arch == "gpt2") if bias is None else bool(bias))


def layer_params(s: Shape) -> int:
    h, f = s.h, s.f
    attn = h * (h + 2 * s.h_kv) + h * h
    if s.arch == "llama":
        mlp, norms = 3 * h * f, 2 * h
    else:
        mlp, norms = 2 * h * f, 4 * h
    if s.bias:
        attn += h + 2 * s.h_kv + h
        mlp += f + h
    return attn + mlp + norms


def count_params(model_cfg: Any) -> int:
    s = model_shape(model_cfg)
    emb = s.V * s.h
    pos = s.block_size * s.h if s.arch == "gpt2" else 0
    final_norm = 2 * s.h if s.arch == "gpt2" else s.h
    head = 0 if s.tied else s.V * s.h
    return emb + pos + s.L * layer_params(s) + final_norm + head


def flops_per_token(model_cfg: Any, seq_len: int) -> float:
    """Training FLOPs per token: 6 * (matmul params incl. the LM head) + 12 * L * h * s (attention)."""
    s = model_shape(model_cfg)
    return 6.0 * (s.L * layer_params(s) + s.V * s.h) + 12.0 * s.L * s.h * seq_len


def _elem_bytes(precision: str) -> int:
    p = precision.lower()
    if p in ("bf16", "fp16", "bfloat16", "float16", "half"):
        return 2
    if p in ("fp32", "float32", "32"):
        return 4
    raise ValueError(f"unknown precision {precision!r} (use fp32, bf16 or fp16)")


def activation_bytes(model_cfg: Any, micro_batch: int, seq_len: int, precision: str = "bf16",
                     activation_checkpointing: bool = False, flash: bool = True) -> int:
    """Bytes of the tensors autograd keeps for backward (see the module docstring)."""
    s = model_shape(model_cfg)
    e, r = _elem_bytes(precision), 4
    sb = seq_len * micro_batch
    llama, half = s.arch == "llama", e == 2
    m = 4 if llama else 2
    norms = (4 if llama else 2) * r * s.h  # RMSNorm as written keeps its input and the normalised input
    # under autocast every projection saves its own bf16 cast of the norm output (q, k, v; up and gate)
    casts = (3 + (2 if llama else 1)) * s.h if half else 2 * s.h
    per_layer = sb * (norms + e * (casts + 2 * s.h + 2 * s.h_kv + m * s.f))
    if not flash:
        per_layer += 2 * e * s.a * seq_len * seq_len * micro_batch
    # + one layer's worth of working memory in backward (activation gradients, recomputation)
    if activation_checkpointing:
        layers = s.L * r * sb * s.h + 2 * per_layer
    else:
        layers = (s.L + 1) * per_layer
    head = sb * s.h * (2 * r + e) + sb * s.V * (e + 8)
    return int(layers + head)


def memory_breakdown(model_cfg: Any, micro_batch: int, seq_len: int, precision: str = "bf16",
                     activation_checkpointing: bool = False, optimizer: str = "adamw", world_size: int = 1,
                     shard: int = 1, device: str = "cuda", flash: bool = True) -> dict[str, int]:
    P = count_params(model_cfg)
    s = model_shape(model_cfg)
    shard = max(1, int(shard))
    opt_states = {"adamw": 8, "adam": 8, "sgd": 4, "lion": 4}.get(optimizer.lower(), 8)
    half = _elem_bytes(precision) == 2
    parts = {
        "params": 4 * P // shard,
        "grads": 4 * P // shard,
        "optimizer": opt_states * P // shard,
        "ddp_buckets": 4 * P if (world_size > 1 and shard == 1) else 0,
        "half_weights": (2 * P // shard + (4 * layer_params(s) if shard > 1 else 0)) if half else 0,
    }
    acts = activation_bytes(model_cfg, micro_batch, seq_len, precision, activation_checkpointing, flash)
    step_tmp = 4 * P // shard
    parts["activations"] = acts
    # the optimizer step runs after backward has freed activations and autocast weight copies
    parts["transient"] = max(0, step_tmp - acts - parts["half_weights"])
    parts["runtime"] = GiB if device in ("cuda", "rocm", "gpu") else int(0.3 * GiB)
    parts["total"] = sum(parts.values())
    return parts


def estimate_memory(model_cfg: Any, micro_batch: int, seq_len: int, precision: str = "bf16",
                    activation_checkpointing: bool = False, optimizer: str = "adamw", world_size: int = 1,
                    shard: int = 1, device: str = "cuda", flash: bool = True) -> int:
    """Predicted peak training memory of one rank in bytes (formula in the module docstring)."""
    return memory_breakdown(model_cfg, micro_batch, seq_len, precision, activation_checkpointing, optimizer,
                            world_size, shard, device, flash)["total"]


# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class AutoConfig:
    micro_batch: int
    grad_accum: int
    precision: str
    activation_checkpointing: bool
    reason: str
    estimated_bytes: int = 0
    fits: bool = True

    def as_overrides(self) -> list[str]:
        return [f"--train.micro_batch={self.micro_batch}", f"--train.grad_accum={self.grad_accum}",
                f"--train.precision={self.precision}",
                f"--train.activation_checkpointing={str(self.activation_checkpointing).lower()}"]


def choose_precision(dev: DeviceInfo) -> str:
    if dev.is_gpu:
        return "bf16" if dev.bf16 else "fp16"
    return "bf16" if dev.bf16 else "fp32"


def _divisors_desc(n: int) -> list[int]:
    return sorted({d for i in range(1, int(math.isqrt(n)) + 1) if n % i == 0 for d in (i, n // i)}, reverse=True)


def auto_config(model_cfg: Any, device_info: DeviceInfo, target_global_batch_seqs: int, world_size: int = 1,
                seq_len: int | None = None, shard: int = 1, fit_fraction: float = FIT_FRACTION,
                precision: str | None = None) -> AutoConfig:
    """Largest micro-batch (a divisor of the per-rank batch, so the effective batch is kept exactly)
    whose estimate fits ``fit_fraction`` of the device memory; activation checkpointing only when
    even micro_batch=1 does not fit without it. ``fits`` is False (with the reason) when nothing fits."""
    seq_len = seq_len or model_shape(model_cfg).block_size
    world_size = max(1, int(world_size))
    if target_global_batch_seqs % world_size:
        per_rank = -(-target_global_batch_seqs // world_size)
        note = (f" (global batch {target_global_batch_seqs} is not a multiple of {world_size} ranks: "
                f"rounded up to {per_rank * world_size})")
    else:
        per_rank, note = max(1, target_global_batch_seqs // world_size), ""
    prec = precision or choose_precision(device_info)
    dev = device_info.vendor if device_info.is_gpu else "cpu"
    budget = int(device_info.memory * fit_fraction)

    def est(mb: int, ckpt: bool) -> int:
        return estimate_memory(model_cfg, mb, seq_len, prec, ckpt, world_size=world_size, shard=shard, device=dev)

    for ckpt in (False, True):
        for mb in _divisors_desc(per_rank):
            need = est(mb, ckpt)
            if need <= budget:
                why = (f"micro-batch {mb} x accumulation {per_rank // mb} x {world_size} rank(s) = "
                       f"{mb * (per_rank // mb) * world_size} sequences of {seq_len} tokens; "
                       f"estimated {need / GiB:.1f} GiB of {device_info.memory / GiB:.0f} GiB "
                       f"({fit_fraction:.0%} budget {budget / GiB:.1f} GiB), {prec}")
                if ckpt:
                    why += ", activation checkpointing (micro-batch 1 does not fit without it)"
                return AutoConfig(mb, per_rank // mb, prec, ckpt, why + note, need)
    need = est(1, True)
    return AutoConfig(1, per_rank, prec, True,
                      f"does not fit: even micro-batch 1 with activation checkpointing needs {need / GiB:.1f} GiB "
                      f"> {budget / GiB:.1f} GiB; shard the model with FSDP over more GPUs "
                      f"(--parallel.strategy=fsdp), use a smaller preset or a shorter context", need, fits=False)


def step_compute_seconds(model_cfg: Any, tokens: int, dev: DeviceInfo, mfu: float = 0.4,
                         tflops: float | None = None) -> float:
    """Rough compute time for ``tokens`` tokens of forward+backward: FLOPs / (peak TFLOPS * MFU).

    ``tflops`` (e.g. measured by doctor with a matmul) overrides the table value of ``dev``."""
    s = model_shape(model_cfg)
    peak = tflops or dev.tflops or peak_tflops(dev.name, dev.vendor) or 10.0
    return flops_per_token(model_cfg, s.block_size) * tokens / (peak * 1e12 * mfu)


def parse_size(text: str) -> int:
    """'24GB', '24 GiB', '80g', '512M' -> bytes (GB and GiB both mean 2**30 here, as vendors' cards do)."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([kmgt]?)i?b?\s*", text.lower())
    if not m:
        raise ValueError(f"bad size {text!r}")
    return int(float(m.group(1)) * 1024 ** " kmgt".index(m.group(2) or " "))


def resolved_model(model_section: Any) -> dict:
    """A config's model section (preset + explicit overrides, None = from the preset) as a plain dict."""
    from gptforge.config.presets import MODEL_PRESETS

    preset = _get(model_section, "preset", None)
    out = dict(MODEL_PRESETS.get(preset, {})) if preset else {}
    fields = dataclasses.asdict(model_section) if dataclasses.is_dataclass(model_section) else dict(model_section)
    out.update({k: v for k, v in fields.items() if v is not None and k != "preset"})
    return out


def apply_auto(cfg: Any, device_info: DeviceInfo | None = None, world_size: int | None = None,
               log=None) -> AutoConfig:
    """`gptforge pretrain --train.auto=true`: keep the configured effective batch (micro_batch x grad_accum x
    data-parallel ranks) and pick micro-batch, accumulation, precision (when train.precision=auto) and
    activation checkpointing for this device. Raises UserError when the model does not fit."""
    from gptforge.errors import UserError

    t, par = cfg.train, getattr(cfg, "parallel", None)
    world = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    tp = int(_get(par, "tp", 1) or 1) if par is not None else 1
    dp = max(1, world // tp)
    strategy = _get(par, "strategy", "auto") if par is not None else "none"
    rep = int(_get(par, "dp_replicate", 1) or 1) if par is not None else 1
    shard = max(1, dp // rep) if strategy in ("auto", "fsdp") and dp > 1 else 1
    if strategy == "ddp":
        shard = 1
    model = resolved_model(cfg.model)
    target = t.micro_batch * t.grad_accum * dp
    dev = device_info or detect()
    prec = None if t.precision == "auto" else t.precision
    ac = auto_config(model, dev, target, dp, model.get("block_size"), shard=shard, precision=prec)
    if not ac.fits:
        raise UserError(f"train.auto: {ac.reason}")
    t.micro_batch, t.grad_accum, t.activation_checkpointing = ac.micro_batch, ac.grad_accum, ac.activation_checkpointing
    if t.precision == "auto":
        t.precision = ac.precision
    if int(os.environ.get("RANK", "0")) == 0:
        (log or (lambda m: print(m, flush=True)))(f"auto-config for {dev.describe()}: {ac.reason}")
    return ac
