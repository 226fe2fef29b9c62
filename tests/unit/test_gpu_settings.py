"""GPU fast-path settings that a CPU can check: vocab rounded to 128 on a GPU (64 on a CPU, so CPU runs keep their
shape), a resume keeping the checkpoint's vocab (a run started on a GPU resumes on a CPU and back), train.tf32."""

from __future__ import annotations

import json

import torch

from conftest import read_losses, tiny_args
from gptforge.cli import main
from gptforge.config.loader import resolve_model
from gptforge.config.presets import preset_model
from gptforge.hardware import set_tf32, vocab_multiple


def test_vocab_multiple_is_128_on_a_gpu_and_64_on_a_cpu():
    assert vocab_multiple(torch.device("cuda", 0), 64) == 128 and vocab_multiple(torch.device("cpu"), 64) == 64
    gpu = resolve_model(preset_model("nano"), 50257, vocab_multiple(torch.device("cuda"), 64))
    cpu = resolve_model(preset_model("nano"), 50257, vocab_multiple(torch.device("cpu"), 64))
    assert (gpu.vocab_size, cpu.vocab_size) == (50304, 50304)  # GPT-2's 50257: 50304 is a multiple of both
    assert resolve_model(preset_model("nano"), 6401, 128).vocab_size == 6528
    assert resolve_model(preset_model("nano"), 6401, 64).vocab_size == 6464


def test_resume_keeps_the_checkpoints_vocab(tmp_path, char_data):
    """A checkpoint with a wider vocab than this device would pick (as a GPU's 128-multiple) resumes as it is."""
    run = tmp_path / "run"
    assert main(["pretrain", *tiny_args(run, char_data, "--train.max_steps=4", "--train.stop_after=2",
                                        "--model.vocab_size=384")]) == 0
    assert main(["pretrain", *tiny_args(run, char_data, "--train.max_steps=4", "--train.resume=auto")]) == 0
    conf = json.loads((run / "checkpoints/step_0000004/model_config.json").read_text())
    assert conf["vocab_size"] == 384 and len(read_losses(run)) == 4


def test_tf32_setting():
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        assert set_tf32(torch.device("cpu"), True) == "" and before == (torch.backends.cuda.matmul.allow_tf32,
                                                                         torch.backends.cudnn.allow_tf32)
        assert set_tf32(torch.device("cuda"), True) == "tf32 on"
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert set_tf32(torch.device("cuda"), False) == "tf32 off" and not torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
