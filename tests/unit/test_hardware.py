"""gptforge.hardware (device table, HSA override, peak FLOP/s, precision policy), gptforge.model.cost
(parameters, FLOPs, memory estimate) and gptforge.train.auto (fitting a model to a device)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from gptforge import hardware as hw
from gptforge.config.presets import NOMINAL_VOCAB, preset_model
from gptforge.errors import UserError
from gptforge.hardware import GiB, DeviceInfo
from gptforge.model import cost
from gptforge.model.gpt import GPT, build_model
from gptforge.train import auto


def P(name: str, **kw):
    """A preset's complete GPTConfig with its usual vocabulary."""
    return preset_model(name, nominal_vocab=True, **kw).complete()


EXPECTED_PARAMS = {"micro": 3.2e6, "nano": 10.7e6, "minimind": 25.8e6, "tiny": 51e6, "small": 124e6, "medium": 354e6,
                   "large": 773e6, "llama-1b": 1.1e9}

DEVICES = {
    "RX 9700 32GB": DeviceInfo("rocm", "AMD Radeon AI PRO R9700", 32 * GiB, "gfx1201", True),
    "RX 7900 XTX 24GB": DeviceInfo("rocm", "AMD Radeon RX 7900 XTX", 24 * GiB, "gfx1100", True),
    "MI300X 192GB": DeviceInfo("rocm", "AMD Instinct MI300X", 192 * GiB, "gfx942", True),
    "RTX 4090 24GB": DeviceInfo("cuda", "NVIDIA GeForce RTX 4090", 24 * GiB, "sm_89", True),
    "A100 40GB": DeviceInfo("cuda", "NVIDIA A100-SXM4-40GB", 40 * GiB, "sm_80", True),
    "A100 80GB": DeviceInfo("cuda", "NVIDIA A100-SXM4-80GB", 80 * GiB, "sm_80", True),
    "H100 80GB": DeviceInfo("cuda", "NVIDIA H100 80GB HBM3", 80 * GiB, "sm_90", True),
    "V100 16GB": DeviceInfo("cuda", "Tesla V100-SXM2-16GB", 16 * GiB, "sm_70", False),
    "CPU 32GB": DeviceInfo("cpu", "x86 CPU", 32 * GiB, "", False),
    "CPU bf16 32GB": DeviceInfo("cpu", "Xeon with AMX", 32 * GiB, "", True),
}
PRESETS = ["nano", "minimind", "tiny", "small", "medium", "large", "llama-1b"]
GLOBAL = 256  # sequences per optimizer step, as in the seeds' two-node presets


@pytest.mark.parametrize("dev_name", list(DEVICES))
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("world", [1, 2, 8])
def test_auto_config_fits_and_keeps_effective_batch(dev_name, preset, world):
    dev = DEVICES[dev_name]
    cfg = auto.auto_config(P(preset), dev, GLOBAL, world)
    seq = P(preset).block_size
    # effective batch preserved exactly
    assert cfg.micro_batch * cfg.grad_accum * world == GLOBAL
    # precision: bf16 where supported, else fp16 on GPUs / fp32 on CPUs
    assert cfg.precision == ("bf16" if dev.bf16 else ("fp16" if dev.is_gpu else "fp32"))
    budget = dev.memory * auto.FIT_FRACTION
    est = lambda mb, ck: cost.estimate_memory(P(preset), mb, seq, cfg.precision, activation_checkpointing=ck,  # noqa: E731
                                              world_size=world, device=dev.vendor)
    if not cfg.fits:
        assert est(1, True) > budget and "FSDP" in cfg.reason
        return
    assert est(cfg.micro_batch, cfg.activation_checkpointing) == cfg.estimated_bytes <= budget
    # the largest micro-batch that fits: the next divisor up does not
    per_rank = GLOBAL // world
    bigger = [d for d in range(cfg.micro_batch + 1, per_rank + 1) if per_rank % d == 0]
    if bigger:
        assert est(bigger[0], cfg.activation_checkpointing) > budget
    # checkpointing only when micro-batch 1 does not fit without it
    assert cfg.activation_checkpointing == (est(1, False) > budget)


def test_specific_choices():
    h100 = auto.auto_config(P("small", arch="gpt2", qk_norm=False, bias=True, d_ff=3072), DEVICES["H100 80GB"], 256, 2)
    assert (h100.micro_batch, h100.precision, h100.activation_checkpointing) == (64, "bf16", False)
    # more memory never gives a smaller micro-batch
    for preset in PRESETS:
        mbs = [auto.auto_config(P(preset), DeviceInfo("cuda", "x", m * GiB, "", True), 256, 1).micro_batch
               for m in (16, 24, 40, 80, 192)]
        assert mbs == sorted(mbs), (preset, mbs)
    # llama-1b on a 26 GB card, one rank: only fits with activation checkpointing
    c = auto.auto_config(P("llama-1b"), DeviceInfo("cuda", "x", 26 * GiB, "", True), 256, 1)
    assert c.fits and c.activation_checkpointing and c.micro_batch >= 1
    # ... and does not fit a 16 GB card at all without FSDP; with 8-way FSDP it does
    c = auto.auto_config(P("llama-1b"), DEVICES["V100 16GB"], 256, 1)
    assert not c.fits and "FSDP" in c.reason
    c = auto.auto_config(P("llama-1b"), DEVICES["V100 16GB"], 256, 8, shard=8)
    assert c.fits and c.precision == "fp16"
    # a global batch that does not divide by the ranks is rounded up and said so
    c = auto.auto_config(P("nano"), DEVICES["H100 80GB"], 10, 4, seq_len=256)
    assert c.micro_batch * c.grad_accum == 3 and "rounded up to 12" in c.reason


@pytest.mark.parametrize("arch,expected", [
    ("gfx1201", "12.0.1"), ("gfx1200", "12.0.0"), ("gfx1101", "11.0.0"), ("gfx1032", "10.3.0"),
    ("gfx1100", None), ("gfx942", None), ("gfx90a", None), ("gfx1030", None), ("sm_90", None), ("", None),
    ("gfx1201:sramecc-:xnack-", "12.0.1"),
])
def test_hsa_override(arch, expected):
    assert hw.hsa_override(arch) == expected


def test_param_count_matches_presets():
    assert set(EXPECTED_PARAMS) == set(NOMINAL_VOCAB)
    for name, expected in EXPECTED_PARAMS.items():
        assert abs(cost.count_params(P(name)) / expected - 1) < 0.03, name


@pytest.mark.parametrize("name", list(NOMINAL_VOCAB))
@pytest.mark.parametrize("bias", [True, False])
def test_param_count_matches_model(name, bias):
    import torch

    cfg = P(name, bias=bias)
    with torch.device("meta"):
        m = GPT(cfg)
    assert cost.count_params(cfg) == m.num_params() == sum(p.numel() for p in m.parameters()), name


OPTIONS = dict(vocab_size=64, qk_norm=True, mlp_act="relu2")  # relu2's m=2, the q/k norms' e(h+h_kv)


@pytest.mark.parametrize("preset,precision,options", [("nano", "fp32", {}), ("nano", "bf16", {}), ("minimind", "fp32", {}),
                                                      ("minimind", "bf16", {}), ("nano", "fp32", OPTIONS),
                                                      ("minimind", "bf16", OPTIONS)])
def test_activation_estimate_matches_saved_tensors(preset, precision, options):
    """The per-layer formula (with the block options too) against the bytes autograd really saves (small vocab:
    no logits term)."""
    import torch

    cfg = P(preset, block_size=128, **options)
    m = build_model(cfg)
    params = {p.untyped_storage().data_ptr() for p in m.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    idx = torch.randint(0, cfg.vocab_size, (2, 128))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            m(idx)
    measured = sum(seen.values())
    # autocast's bf16 weight copies are saved too: the estimate has them as half_weights = 2P
    est = cost.activation_bytes(cfg, 2, 128, precision) + (2 * cost.count_params(cfg) if precision == "bf16" else 0)
    assert 0.95 <= est / measured <= 1.3, (est, measured)


_PEAK_SCRIPT = r"""
import json, sys, torch, torch.nn.functional as F
from gptforge.model.gpt import GPTConfig, build_model
from gptforge.config.presets import preset_model
def rss(key):
    for l in open("/proc/self/status"):
        if l.startswith(key): return int(l.split()[1]) * 1024
torch.set_num_threads(2)
base = rss("VmRSS")
b, T = 4, 256
cfg = preset_model("nano", nominal_vocab=True, block_size=T).complete()
m = build_model(cfg); opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
for _ in range(2):
    x = torch.randint(0, cfg.vocab_size, (b, T)); y = torch.randint(0, cfg.vocab_size, (b, T))
    F.cross_entropy(m(x).view(-1, cfg.vocab_size), y.view(-1)).backward(); opt.step(); opt.zero_grad(set_to_none=False)
print(json.dumps({"peak": rss("VmHWM") - base}))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc")
def test_estimate_against_measured_cpu_peak():
    """A real training step of nano on CPU (peak RSS growth) is within the estimate's ballpark."""
    r = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    peak = json.loads(r.stdout.strip().splitlines()[-1])["peak"]
    est = cost.estimate_memory(P("nano", block_size=256), 4, 256, "fp32", device="cpu")
    assert 0.8 <= est / peak <= 1.8, (est, peak)


def test_memory_breakdown_terms():
    small = P("small")
    n = cost.count_params(small)
    b = cost.memory_breakdown(small, 1, 1024, "fp32", world_size=1)
    assert b["params"] == b["grads"] == 4 * n and b["optimizer"] == 8 * n and b["ddp_buckets"] == 0
    assert b["half_weights"] == 0
    b2 = cost.memory_breakdown(small, 1, 1024, "bf16", world_size=2)
    assert b2["ddp_buckets"] == 4 * n and b2["half_weights"] == 2 * n
    b8 = cost.memory_breakdown(small, 1, 1024, "bf16", world_size=8, shard=8)
    assert b8["params"] == 4 * n // 8 and b8["ddp_buckets"] == 0
    # checkpointing saves memory; activations grow linearly with the micro-batch
    assert cost.activation_bytes(small, 8, 1024, "bf16", True) < cost.activation_bytes(small, 8, 1024, "bf16")
    a1, a2 = cost.activation_bytes(small, 1, 1024), cost.activation_bytes(small, 2, 1024)
    assert a2 == 2 * a1


def test_detect_on_this_machine():
    info = hw.detect()
    assert info.vendor in ("cuda", "rocm", "cpu") and info.memory > 0 and info.count >= 1
    assert info.describe()


def test_peak_flops_table_and_cpu_model():
    assert hw.peak_tflops("NVIDIA H100 PCIe") == 756.0 and hw.peak_tflops("AMD Instinct MI300X") == 1307.4
    assert hw.peak_tflops("Some Unknown GPU") is None
    # the CPU peak: cores x 2.5 GHz x FLOP/cycle of the vector unit (one model for MFU and doctor)
    assert hw.cpu_flops_per_cycle("fp32", {"avx512f"}) == 64 and hw.cpu_flops_per_cycle("fp32", {"avx2"}) == 32
    assert hw.cpu_flops_per_cycle("bf16", {"avx512f", "avx512_bf16"}) == 128
    assert hw.cpu_flops_per_cycle("bf16", {"amx_bf16"}) == 1024
    assert hw.peak_tflops("", "cpu", 4, "fp32") == pytest.approx(4 * 2.5 * hw.cpu_flops_per_cycle("fp32") / 1e3)


# torch.cuda.get_device_name() (and gcnArchName on ROCm) as the drivers report them -> dense bf16 TFLOP/s
REAL_NAMES = [
    ("NVIDIA H100 80GB HBM3", "", 989.4), ("NVIDIA H100 PCIe", "", 756.0), ("NVIDIA H100 NVL", "", 835.0),
    ("NVIDIA H200", "", 989.4), ("NVIDIA H200 NVL", "", 835.0), ("NVIDIA GH200 480GB", "", 989.4),
    ("NVIDIA A100-SXM4-80GB", "", 312.0), ("NVIDIA A100-PCIE-40GB", "", 312.0), ("NVIDIA A100 80GB PCIe", "", 312.0),
    ("NVIDIA GeForce RTX 4090", "", 165.2), ("NVIDIA L40S", "", 362.05), ("NVIDIA L40", "", 181.05),
    ("NVIDIA L4", "", 121.0), ("NVIDIA A10", "", 125.0),
    ("AMD Instinct MI300X", "gfx942:sramecc+:xnack-", 1307.4), ("AMD Instinct MI300X VF", "gfx942", 1307.4),
    ("AMD Instinct MI250X", "gfx90a:sramecc+:xnack-", 191.5), ("AMD Instinct MI250X/MI250", "gfx90a", 191.5),
    ("AMD Instinct MI250", "gfx90a", 181.05), ("AMD Instinct MI210", "gfx90a", 181.0),
    ("AMD Radeon AI PRO R9700", "gfx1201", 191.0), ("AMD Radeon RX 9070 XT", "gfx1201", 195.0),
    ("AMD Radeon RX 7900 XTX", "gfx1100", 123.0),
    # a generic ROCm name: the gfx arch decides
    ("AMD Radeon Graphics", "gfx1201", 191.0), ("AMD Radeon Graphics", "gfx942:sramecc+:xnack-", 1307.4),
    ("AMD Radeon Graphics", "", None), ("NVIDIA Graphics Device", "", None),
]


@pytest.mark.parametrize("name,arch,tflops", REAL_NAMES)
def test_peak_tflops_of_real_device_names(name, arch, tflops):
    assert hw.peak_tflops(name, arch=arch) == tflops


def test_flops_per_token_formula():
    """6 x matmul parameters (LM head included, embeddings and norms not) + 12 L d T; one formula for MFU,
    auto-config and doctor."""
    c = P("small", arch="gpt2", qk_norm=False, bias=True, d_ff=3072)  # GPT-2 124M
    L, d, T, V = c.n_layer, c.d_model, c.block_size, c.vocab_size
    matmul = L * (4 * d * d + 2 * d * c.d_ff) + V * d
    biases_norms = L * (4 * d + c.d_ff + d + 4 * d)
    assert cost.flops_per_token(c) == 6 * (matmul + biases_norms) + 12 * L * d * T
    assert cost.flops_per_token(c, 256) < cost.flops_per_token(c)


@pytest.mark.parametrize("requested,device,bf16,expected", [
    ("auto", "cuda", True, "bf16"), ("auto", "cuda", False, "fp16"), ("auto", "cpu", True, "bf16"),
    ("auto", "cpu", False, "fp32"), ("fp32", "cuda", True, "fp32"), ("fp16", "cuda", True, "fp16"),
    ("bf16", "cpu", False, "bf16"),
])
def test_one_precision_policy(requested, device, bf16, expected):
    assert hw.resolve_precision(requested, device, bf16) == expected


def test_fp16_on_cpu_is_a_user_error():
    with pytest.raises(UserError, match="fp16 is for GPUs"):
        hw.resolve_precision("fp16", "cpu", True)


def test_apply_auto_on_a_config(capsys):
    from gptforge.config.schema import Config

    cfg = Config(model=preset_model("small"))
    cfg.train.micro_batch, cfg.train.grad_accum = 8, 16
    ac = auto.apply_auto(cfg, P("small"), DEVICES["RTX 4090 24GB"], world_size=2)
    assert (cfg.train.micro_batch, cfg.train.grad_accum) == (ac.micro_batch, ac.grad_accum)
    assert cfg.train.micro_batch * cfg.train.grad_accum * 2 == 8 * 16 * 2  # effective batch kept
    assert cfg.train.precision == "bf16" and "auto-config for" in capsys.readouterr().out
    cfg = Config(model=preset_model("llama-1b"))
    cfg.train.precision = "fp32"
    with pytest.raises(UserError, match="does not fit"):
        auto.apply_auto(cfg, P("llama-1b"), DEVICES["V100 16GB"], world_size=1)
