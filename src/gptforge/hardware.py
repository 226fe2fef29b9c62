"""The hardware: device detection (CUDA / ROCm / CPU), peak FLOP/s, and the one precision policy.

``detect()`` describes the accelerator without a model in mind; what a model needs of it is
``gptforge.model.cost``; fitting one to the other (``--train.auto``) is ``gptforge.train.auto``.
``hsa_override()`` names the ``HSA_OVERRIDE_GFX_VERSION`` a consumer AMD card needs (``launch`` sets it).
"""

from __future__ import annotations

import dataclasses
import os

from gptforge.errors import UserError

GiB = 1024**3
DEVICE_CHOICES = "auto, cpu, cuda, cuda:N"


def check_device_name(name: str, what: str) -> None:
    """A device name as the user may write it (auto | cpu | cuda | cuda:N); UserError naming `what` otherwise."""
    kind, _, index = str(name).partition(":")
    ok = (name in ("auto", "cpu", "cuda")) or (kind == "cuda" and index.isdigit())
    if not ok:
        raise UserError(f"{what} must be one of {DEVICE_CHOICES}, got {name!r}")
FIT_FRACTION = 0.88  # of the device memory a run may plan to use; the rest is left for allocator fragmentation

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

# Peak dense (no sparsity) bf16 tensor TFLOP/s of ONE device as torch sees it, by a fragment of
# torch.cuda.get_device_name() (lower case; first match wins, so the longer names come first), for MFU and
# doctor's estimates. The vendors' numbers:
# - NVIDIA H100/H200 datasheets: H100 SXM and H200 (SXM) 989.4, H100 PCIe 756, H100/H200 NVL 835 ("1,979 /
#   1,513 / 1,671 teraFLOPS" there are with sparsity: halved here); A100 whitepaper 312 (SXM and PCIe).
# - NVIDIA L40S datasheet: BF16 tensor 362.05 (733 with sparsity); L40: 181.05.
# - NVIDIA Ada whitepaper (RTX 4090): BF16 tensor with FP32 accumulate 165.2 (330.3 with sparsity).
# - AMD Instinct MI300X data sheet: 1307.4 BF16 dense (MI325X the same).
# - AMD Instinct MI250X / MI250: 383.0 / 362.1 per OAM module, which ROCm shows as two devices (two GCDs):
#   191.5 / 181.05 per device; MI210 (one GCD) 181.0. ROCm may name both "AMD Instinct MI250X/MI250": taken
#   as the MI250X (Frontier, LUMI).
# - AMD Radeon AI PRO R9700 (gfx1201, 64 CUs at 2.92 GHz): 191 FP16/BF16 matrix dense (383 with sparsity;
#   1531 INT4 sparse TOPS); RX 9070 XT (gfx1201, 2.97 GHz): 195. RX 7900 XTX (gfx1100): 123.
TFLOPS_TABLE: list[tuple[str, float]] = [
    ("gh200", 989.4), ("h200 nvl", 835.0), ("h200", 989.4), ("h100 nvl", 835.0), ("h100 pcie", 756.0),
    ("h100", 989.4), ("b200", 2250.0),
    ("a100", 312.0), ("a6000", 155.0), ("l40s", 362.05), ("l40", 181.05), ("l4", 121.0), ("a10", 125.0),
    ("4090", 165.2), ("4080", 97.0), ("3090", 71.0), ("v100", 125.0), ("t4", 65.0),
    ("mi300x", 1307.4), ("mi325x", 1307.4), ("mi250x", 191.5), ("mi250", 181.05), ("mi210", 181.0),
    ("r9700", 191.0), ("9700", 191.0), ("9070 xt", 195.0), ("9070", 195.0), ("7900 xtx", 123.0), ("7900", 123.0),
]
# ROCm may name a card generically ("AMD Radeon Graphics"): then its gfx arch decides (the smallest part of it).
ARCH_TFLOPS: dict[str, float] = {"gfx942": 1307.4, "gfx90a": 181.0, "gfx1201": 191.0, "gfx1100": 123.0}
CPU_GHZ = 2.5  # nominal clock for the CPU peak (MFU on a CPU is a rough figure)


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


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return set(next((ln for ln in f if ln.startswith("flags")), "").split())
    except OSError:
        return set()


def cpu_flops_per_cycle(precision: str = "fp32", flags: set[str] | None = None) -> int:
    """Per-core FLOP/cycle of the vector unit: FMA = 2 ops x lanes x 2 units; AMX for bf16."""
    flags = _cpu_flags() if flags is None else flags
    if precision == "bf16" and "amx_bf16" in flags:
        return 1024
    base = 64 if "avx512f" in flags else 32
    return base * 2 if precision == "bf16" and "avx512_bf16" in flags else base


def peak_tflops(name: str, vendor: str = "cuda", cpu_cores: int | None = None, precision: str = "bf16",
                arch: str = "") -> float | None:
    """Peak dense TFLOP/s of one device: GPUs from the table by name, else by gfx arch (None when unknown), a
    CPU from its cores."""
    if vendor == "cpu":
        return (cpu_cores or os.cpu_count() or 1) * CPU_GHZ * cpu_flops_per_cycle(precision) / 1e3
    low = " ".join(name.lower().replace("-", " ").split())
    for frag, tf in TFLOPS_TABLE:
        if frag in low:
            return tf
    return ARCH_TFLOPS.get(arch.split(":")[0].strip().lower()) if arch else None


def peak_flops(device, precision: str = "bf16") -> float:
    """Peak FLOP/s of one torch device for MFU (a CPU: the threads torch uses); 0.0 when unknown."""
    import torch

    if device.type == "cuda":
        arch = (getattr(torch.cuda.get_device_properties(device), "gcnArchName", "") or "") if torch.version.hip else ""
        return (peak_tflops(torch.cuda.get_device_name(device), arch=arch) or 0.0) * 1e12
    return (peak_tflops("", "cpu", torch.get_num_threads(), precision) or 0.0) * 1e12


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


def memory_for_weights() -> int:
    """Bytes this process can fill now: the memory available (MemAvailable), capped by its address-space limit."""
    import resource

    have = _cpu_memory()
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    return min(have, soft) if soft != resource.RLIM_INFINITY else have


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
                          torch.cuda.device_count(), peak_tflops(props.name, arch=arch if rocm else ""))
    name, bf16 = _cpu_name(), cpu_bf16_supported()
    return DeviceInfo("cpu", name, _cpu_memory(), "", bf16, 1, peak_tflops(name, "cpu", None, "bf16" if bf16 else "fp32"))


def hsa_override(arch: str) -> str | None:
    """The HSA_OVERRIDE_GFX_VERSION value a consumer RDNA card needs, or None."""
    return HSA_OVERRIDES.get(arch.split(":")[0].strip().lower()) if arch else None


# ---- the one precision policy ----------------------------------------------------------------------------
def resolve_precision(requested: str, device_type: str, bf16_supported: bool) -> str:
    """train.precision -> fp32 | bf16 | fp16 for this device. auto: bf16 where the device has it natively
    (GPUs since Ampere / MI200, CPUs with AVX512-BF16 or AMX), else fp16 on a GPU and fp32 on a CPU."""
    gpu = device_type in ("cuda", "rocm", "gpu")
    if requested == "auto":
        return "bf16" if bf16_supported else ("fp16" if gpu else "fp32")
    if requested == "fp16" and not gpu:
        raise UserError("train.precision=fp16 is for GPUs; use bf16 or fp32 on the CPU")
    if requested not in ("fp32", "bf16", "fp16"):
        raise UserError(f"train.precision must be auto, fp32, bf16 or fp16, got {requested!r}")
    return requested


def device_precision(requested: str, device) -> str:
    """resolve_precision for a torch device."""
    import torch

    if device.type == "cuda":
        return resolve_precision(requested, "cuda", bool(torch.cuda.is_bf16_supported()))
    return resolve_precision(requested, device.type, cpu_bf16_supported())


# ---- GPU fast-path settings ---------------------------------------------------------------------------------
GPU_VOCAB_MULTIPLE = 128  # embedding / lm_head rows on a GPU: tensor-core friendly tiles


def vocab_multiple(device, default: int) -> int:
    """The multiple a tokenizer's vocab is rounded up to on `device`: 128 on a GPU, `default` (64) elsewhere,
    so a CPU run keeps its shape and its checkpoints."""
    return GPU_VOCAB_MULTIPLE if getattr(device, "type", device) == "cuda" else default


def set_tf32(device, enabled: bool) -> str:
    """train.tf32: fp32 matmuls and convolutions on TF32 tensor cores (CUDA/ROCm; no effect on a CPU).
    -> the setting as logged ("tf32 on" | "tf32 off" | "" on a CPU)."""
    import torch

    if getattr(device, "type", device) != "cuda":
        return ""
    torch.backends.cuda.matmul.allow_tf32 = bool(enabled)
    torch.backends.cudnn.allow_tf32 = bool(enabled)
    return "tf32 on" if enabled else "tf32 off"


def peak_rss_bytes() -> int:
    """This process image's peak resident memory: VmHWM, which starts afresh at exec (``ru_maxrss`` would
    carry the parent's RSS at fork into a child that exec'd, e.g. a bench worker started from a big process)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmHWM:"))
    except (OSError, StopIteration):  # not Linux: the kernel's own figure (KiB on Linux, bytes on macOS)
        import resource
        import sys

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss if sys.platform == "darwin" else rss * 1024
