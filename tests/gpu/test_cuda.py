"""GPU checks (CUDA or ROCm): skipped on machines without a GPU. Run them where one is present:
`python -m pytest -q tests/gpu`."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import read_losses, tiny_args
from gptforge.cli import main

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA/ROCm GPU")]


def _gpu_args(out, data, *extra):
    args = [a for a in tiny_args(out, data, *extra) if not a.startswith(("--train.precision", "--train.device"))]
    return [*args, "--train.device=cuda", "--train.precision=bf16"]


def test_bf16_training_on_gpu_learns(tmp_path, char_data):
    assert main(["pretrain", *_gpu_args(tmp_path, char_data, "--train.max_steps=30")]) == 0
    losses = read_losses(tmp_path)
    assert losses[-1] < losses[0] - 1.0


def test_gpu_matches_cpu_in_fp32(tmp_path, char_data):
    cpu, gpu = tmp_path / "cpu", tmp_path / "gpu"
    assert main(["pretrain", *tiny_args(cpu, char_data, "--train.max_steps=5")]) == 0
    # TF32 off (train.tf32 defaults on for a GPU and rounds fp32 matmuls to 10-bit mantissas)
    args = [a for a in tiny_args(gpu, char_data, "--train.max_steps=5")] + ["--train.device=cuda", "--train.tf32=false"]
    assert main(["pretrain", *args]) == 0
    a, b = read_losses(cpu), read_losses(gpu)
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-3, (a, b)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_nccl_one_gpu_smoke(tmp_path, char_data, strategy):
    """torchrun with one process on NCCL: DDP and FSDP2 (bf16 mixed precision) end cleanly."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1", "-m", "gptforge",
           "pretrain", *_gpu_args(tmp_path, char_data, "--train.max_steps=5"), f"--parallel.strategy={strategy}"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "terminate called" not in p.stderr
    assert len(read_losses(tmp_path)) == 5


def _losses(tmp_path, char_data, name, *extra):
    out = tmp_path / name
    assert main(["pretrain", *[a for a in tiny_args(out, char_data, "--train.log_every=1", *extra)
                               if not a.startswith("--train.device")]]) == 0
    return read_losses(out)


def test_bf16_on_gpu_follows_the_cpu_fp32_loss_curve(tmp_path, char_data):
    """Same seed, data and model: the GPU's bf16 autocast curve stays within a few percent of the CPU's fp32 one
    over 30 steps (bf16 rounds to 3 significant digits; a wrong kernel or a lost scale drifts far more)."""
    cpu = _losses(tmp_path, char_data, "cpu", "--train.max_steps=30", "--train.device=cpu")
    gpu = _losses(tmp_path, char_data, "gpu", "--train.max_steps=30", "--train.device=cuda", "--train.precision=bf16")
    assert len(cpu) == len(gpu) == 30
    assert abs(gpu[0] - cpu[0]) < 0.02, (cpu[0], gpu[0])  # the first loss: same weights, same batch
    assert max(abs(a - b) / a for a, b in zip(cpu, gpu)) < 0.05, (cpu, gpu)
    assert sum(gpu[-5:]) / 5 < gpu[0] - 1.0  # and it learns


def test_fp16_with_grad_scaler_learns(tmp_path, char_data, capsys):
    losses = _losses(tmp_path, char_data, "fp16", "--train.max_steps=30", "--train.device=cuda",
                     "--train.precision=fp16")
    assert "precision fp16" in capsys.readouterr().out  # fp16 ran (with the GradScaler the trainer makes for it)
    assert all(x == x and x < 1e4 for x in losses)  # finite
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0, losses


def test_compile_matches_eager_on_gpu(tmp_path, char_data):
    eager = _losses(tmp_path, char_data, "eager", "--train.max_steps=8", "--train.device=cuda")
    compiled = _losses(tmp_path, char_data, "compiled", "--train.max_steps=8", "--train.device=cuda",
                       "--train.compile=true")
    assert max(abs(a - b) for a, b in zip(eager, compiled)) < 1e-2, (eager, compiled)


def test_sweep_backs_off_from_out_of_memory_in_fresh_processes(tmp_path, char_data):
    """bench --sweep on the GPU: a micro-batch that runs out of memory (far beyond any GPU: ~1 TB of
    activations) is retried at half in a new process until one fits."""
    tiny = [a for a in tiny_args(tmp_path, char_data) if a.startswith("--model.") and "block_size" not in a]
    assert main(["bench", "--sweep", "--sweep-grid", "none", "--device", "cuda", "--precision", "bf16",
                 "--micro-batch", "65536", "--steps", "3", "--warmup", "1", "--data", str(char_data),
                 "--json", str(tmp_path / "s.json"), "--", *tiny[1:], "--model.block_size=1024"]) == 0
    d = json.loads((tmp_path / "s.json").read_text())
    tries = d["tries"]
    assert tries[0]["oom"] and not tries[-1]["oom"] and all(t["oom"] for t in tries[:-1])
    assert [t["micro_batch"] for t in tries] == [65536 >> i for i in range(len(tries))]
    best = d["best"]
    assert best["peak_memory_kind"] == "cuda max allocated" and best["peak_memory_bytes"] > 0
    assert best["tokens_per_step"] == best["micro_batch"] * 1024
    assert best["mfu"] is None or 0 < best["mfu"] < 1


def test_compile_on_gpu(tmp_path, char_data):
    assert main(["pretrain", *_gpu_args(tmp_path, char_data, "--train.max_steps=5", "--train.compile=true")]) == 0
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 5
