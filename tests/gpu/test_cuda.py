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
    args = [a for a in tiny_args(gpu, char_data, "--train.max_steps=5")] + ["--train.device=cuda"]
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


def test_compile_on_gpu(tmp_path, char_data):
    assert main(["pretrain", *_gpu_args(tmp_path, char_data, "--train.max_steps=5", "--train.compile=true")]) == 0
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 5
