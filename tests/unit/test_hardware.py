"""gptforge/hardware.py: device table, HSA override, memory estimate, auto-config."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from gptforge.config.presets import MODEL_PRESETS
from gptforge import hardware as hw
from gptforge.hardware import GiB, DeviceInfo

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
    cfg = hw.auto_config(MODEL_PRESETS[preset], dev, GLOBAL, world)
    seq = MODEL_PRESETS[preset]["block_size"]
    # effective batch preserved exactly
    assert cfg.micro_batch * cfg.grad_accum * world == GLOBAL
    # precision: bf16 where supported, else fp16 on GPUs / fp32 on CPUs
    assert cfg.precision == ("bf16" if dev.bf16 else ("fp16" if dev.is_gpu else "fp32"))
    budget = dev.memory * hw.FIT_FRACTION
    est = lambda mb, ck: hw.estimate_memory(MODEL_PRESETS[preset], mb, seq, cfg.precision, ck, world_size=world,  # noqa: E731
                                            device=dev.vendor)
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
    P = MODEL_PRESETS
    h100 = hw.auto_config(P["small"], DEVICES["H100 80GB"], 256, 2)
    assert (h100.micro_batch, h100.precision, h100.activation_checkpointing) == (64, "bf16", False)
    # more memory never gives a smaller micro-batch
    for preset in PRESETS:
        mbs = [hw.auto_config(P[preset], DeviceInfo("cuda", "x", m * GiB, "", True), 256, 1).micro_batch
               for m in (16, 24, 40, 80, 192)]
        assert mbs == sorted(mbs), (preset, mbs)
    # llama-1b on a 28 GB card, one rank: only fits with activation checkpointing
    c = hw.auto_config(P["llama-1b"], DeviceInfo("cuda", "x", 28 * GiB, "", True), 256, 1)
    assert c.fits and c.activation_checkpointing and c.micro_batch >= 1
    # ... and does not fit a 16 GB card at all without FSDP; with 8-way FSDP it does
    c = hw.auto_config(P["llama-1b"], DEVICES["V100 16GB"], 256, 1)
    assert not c.fits and "FSDP" in c.reason
    c = hw.auto_config(P["llama-1b"], DEVICES["V100 16GB"], 256, 8, shard=8)
    assert c.fits and c.precision == "fp16"
    # a global batch that does not divide by the ranks is rounded up and said so
    c = hw.auto_config(P["nano"], DEVICES["H100 80GB"], 10, 4, seq_len=256)
    assert c.micro_batch * c.grad_accum == 3 and "rounded up to 12" in c.reason
    assert c.as_overrides()[0].startswith("--train.micro_batch=")


@pytest.mark.parametrize("arch,expected", [
    ("gfx1201", "12.0.1"), ("gfx1200", "12.0.0"), ("gfx1101", "11.0.0"), ("gfx1032", "10.3.0"),
    ("gfx1100", None), ("gfx942", None), ("gfx90a", None), ("gfx1030", None), ("sm_90", None), ("", None),
    ("gfx1201:sramecc-:xnack-", "12.0.1"),
])
def test_hsa_override(arch, expected):
    assert hw.hsa_override(arch) == expected


def test_apply_hsa_override_respects_user_value():
    env = {}
    assert hw.apply_hsa_override("gfx1201", env) == "12.0.1" and env["HSA_OVERRIDE_GFX_VERSION"] == "12.0.1"
    env = {"HSA_OVERRIDE_GFX_VERSION": "11.0.0"}
    assert hw.apply_hsa_override("gfx1201", env) == "11.0.0" and env["HSA_OVERRIDE_GFX_VERSION"] == "11.0.0"
    env = {}
    assert hw.apply_hsa_override("gfx942", env) is None and env == {}


def test_param_count_matches_presets():
    from gptforge.config.presets import EXPECTED_PARAMS

    for name, expected in EXPECTED_PARAMS.items():
        assert abs(hw.count_params(MODEL_PRESETS[name]) / expected - 1) < 0.03, name


def test_param_count_matches_model():
    gpt = pytest.importorskip("gptforge.model.gpt")
    import torch

    for name in ("nano", "minimind"):
        d = MODEL_PRESETS[name]
        cfg = gpt.GPTConfig(**{k: v for k, v in d.items() if k in gpt.GPTConfig.__dataclass_fields__})
        with torch.device("meta"):
            m = gpt.GPT(cfg)
        assert hw.count_params(d) == sum(p.numel() for p in m.parameters()), name


@pytest.mark.parametrize("preset,precision", [("nano", "fp32"), ("nano", "bf16"), ("minimind", "fp32"),
                                              ("minimind", "bf16")])
def test_activation_estimate_matches_saved_tensors(preset, precision):
    """The per-layer formula against the bytes autograd really saves (small vocab: no logits term)."""
    gpt = pytest.importorskip("gptforge.model.gpt")
    import torch

    d = dict(MODEL_PRESETS[preset], block_size=128)
    cfg = gpt.GPTConfig(**{k: v for k, v in d.items() if k in gpt.GPTConfig.__dataclass_fields__})
    m = gpt.build_model(cfg)
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
    est = hw.activation_bytes(d, 2, 128, precision) + (2 * hw.count_params(d) if precision == "bf16" else 0)
    assert 0.95 <= est / measured <= 1.3, (est, measured)


_PEAK_SCRIPT = r"""
import json, sys, torch, torch.nn.functional as F
from gptforge.model.gpt import GPTConfig, build_model
from gptforge.config.presets import MODEL_PRESETS
def rss(key):
    for l in open("/proc/self/status"):
        if l.startswith(key): return int(l.split()[1]) * 1024
torch.set_num_threads(2)
base = rss("VmRSS")
b, T = 4, 256
d = dict(MODEL_PRESETS["nano"], block_size=T)
cfg = GPTConfig(**{k: v for k, v in d.items() if k in GPTConfig.__dataclass_fields__})
m = build_model(cfg); opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
for _ in range(2):
    x = torch.randint(0, cfg.vocab_size, (b, T)); y = torch.randint(0, cfg.vocab_size, (b, T))
    F.cross_entropy(m(x).view(-1, cfg.vocab_size), y.view(-1)).backward(); opt.step(); opt.zero_grad(set_to_none=False)
print(json.dumps({"peak": rss("VmHWM") - base}))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc")
def test_estimate_against_measured_cpu_peak():
    """A real training step of nano on CPU (peak RSS growth) is within the estimate's ballpark."""
    pytest.importorskip("gptforge.model.gpt")
    r = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    peak = json.loads(r.stdout.strip().splitlines()[-1])["peak"]
    est = hw.estimate_memory(MODEL_PRESETS["nano"] | {"block_size": 256}, 4, 256, "fp32", device="cpu")
    assert 0.8 <= est / peak <= 1.8, (est, peak)


def test_memory_breakdown_terms():
    P = hw.count_params("small")
    b = hw.memory_breakdown("small", 1, 1024, "fp32", world_size=1)
    assert b["params"] == b["grads"] == 4 * P and b["optimizer"] == 8 * P and b["ddp_buckets"] == 0
    assert b["half_weights"] == 0
    b2 = hw.memory_breakdown("small", 1, 1024, "bf16", world_size=2)
    assert b2["ddp_buckets"] == 4 * P and b2["half_weights"] == 2 * P
    b8 = hw.memory_breakdown("small", 1, 1024, "bf16", world_size=8, shard=8)
    assert b8["params"] == 4 * P // 8 and b8["ddp_buckets"] == 0
    # checkpointing saves memory; activations grow linearly with the micro-batch
    assert hw.activation_bytes("small", 8, 1024, "bf16", True) < hw.activation_bytes("small", 8, 1024, "bf16")
    a1, a2 = hw.activation_bytes("small", 1, 1024), hw.activation_bytes("small", 2, 1024)
    assert a2 == 2 * a1


def test_detect_on_this_machine():
    info = hw.detect()
    assert info.vendor in ("cuda", "rocm", "cpu") and info.memory > 0 and info.count >= 1
    assert info.describe()


def test_step_time_and_parse_size():
    dev = DEVICES["H100 80GB"]
    t = hw.step_compute_seconds("small", 8 * 1024, dev)
    assert 1e-3 < t < 1.0
    assert hw.parse_size("24GB") == 24 * GiB and hw.parse_size("512M") == 512 * 1024**2
    assert hw.peak_tflops("NVIDIA H100 PCIe") == 756.0 and hw.peak_tflops("AMD Instinct MI300X") == 1307.0


def test_apply_auto_on_a_config(capsys):
    schema = pytest.importorskip("gptforge.config.schema")
    cfg = schema.Config()
    cfg.model.preset, cfg.train.micro_batch, cfg.train.grad_accum = "small", 8, 16
    ac = hw.apply_auto(cfg, DEVICES["RTX 4090 24GB"], world_size=2)
    assert (cfg.train.micro_batch, cfg.train.grad_accum) == (ac.micro_batch, ac.grad_accum)
    assert cfg.train.micro_batch * cfg.train.grad_accum * 2 == 8 * 16 * 2  # effective batch kept
    assert cfg.train.precision == "bf16" and "auto-config for" in capsys.readouterr().out
    cfg = schema.Config()
    cfg.model.preset, cfg.train.precision = "llama-1b", "fp32"
    from gptforge.errors import UserError

    with pytest.raises(UserError, match="does not fit"):
        hw.apply_auto(cfg, DEVICES["V100 16GB"], world_size=1)
