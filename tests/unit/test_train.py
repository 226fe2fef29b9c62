"""Single-process training: loss falls, exact resume, atomic checkpoints, clear errors."""

import json
import shutil
import threading

import pytest

from conftest import read_losses, tiny_args
from gptforge.cli import main
from gptforge.checkpoint import list_checkpoints


def test_loss_falls_and_checkpoint_written(trained_run):
    losses = read_losses(trained_run)
    assert len(losses) == 40
    assert losses[-1] < losses[0] - 1.0, losses  # from ~ln(vocab) toward the character statistics
    ck = list_checkpoints(trained_run)
    assert ck and ck[-1].name == "step_0000040"
    for f in ("config.json", "model_config.json", "tokenizer.json", "trainer_state.json", ".metadata"):
        assert (ck[-1] / f).is_file(), f
    cfg = json.loads((ck[-1] / "config.json").read_text())
    assert cfg["train"]["max_steps"] == 40 and cfg["model"]["d_model"] == 64
    # each log step reports how long a step waited for its batches (the prefetch thread): a part of the step
    perf = [r for r in map(json.loads, (trained_run / "metrics.jsonl").read_text().splitlines()) if "perf/step_ms" in r]
    assert len(perf) >= 8 and all(0 <= r["perf/data_wait_ms"] < r["perf/step_ms"] for r in perf)


def test_exact_resume_bitwise(tmp_path, char_data):
    full, split = tmp_path / "full", tmp_path / "split"
    # the uninterrupted run loads its batches without the prefetch thread; the split one with 3 ahead
    assert main(["pretrain", *tiny_args(full, char_data, "--train.max_steps=20", "--train.prefetch=0")]) == 0
    # 10 steps, then stop (a separate run of the same 20-step schedule, ended early by max_steps of the
    # schedule is not allowed to change the LR curve: use save_every and kill-free early stop instead)
    assert main(["pretrain", *tiny_args(split, char_data, "--train.max_steps=20", "--train.save_every=10",
                                        "--train.stop_after=10", "--train.prefetch=3")]) == 0
    assert list_checkpoints(split)[-1].name == "step_0000010"
    # the saved position counts the 10 x 4 windows trained on, not those the thread had prepared ahead
    state = json.loads((list_checkpoints(split)[-1] / "trainer_state.json").read_text())
    assert state["loader"] == {"epoch": 0, "pos": 40, "seed": state["loader"]["seed"]}
    assert main(["pretrain", *tiny_args(split, char_data, "--train.max_steps=20", "--train.resume=auto")]) == 0
    a, b = read_losses(full), read_losses(split)
    assert len(a) == 20 and len(b) == 20
    assert a == b  # bitwise identical floats


def test_resume_falls_back_when_latest_is_corrupt(tmp_path, char_data):
    out = tmp_path / "run"
    assert main(["pretrain", *tiny_args(out, char_data, "--train.max_steps=6", "--train.save_every=3",
                                        "--train.keep_last=3")]) == 0
    ck = list_checkpoints(out)
    assert [c.name for c in ck] == ["step_0000003", "step_0000006"]
    shard = next(ck[-1].glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])  # truncated, as by a crash mid-copy
    assert main(["pretrain", *tiny_args(out, char_data, "--train.max_steps=8", "--train.resume=auto")]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 8


def test_interrupted_save_leaves_previous_checkpoint(tmp_path, trained_run):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    # a save killed half way leaves only a .partial dir, which is never picked up
    partial = run / "checkpoints" / "step_0000050.partial"
    partial.mkdir()
    (partial / "__0_0.distcp").write_bytes(b"half")
    assert list_checkpoints(run)[-1].name == "step_0000040"


def test_corrupt_checkpoint_is_one_line_error(tmp_path, trained_run, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    ck = list_checkpoints(run)[-1]
    shard = next(ck.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:1000])
    assert main(["generate", "--checkpoint", str(ck), "--max-new-tokens", "5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "corrupt or truncated" in err


def test_resume_with_incompatible_config(tmp_path, trained_run, char_data, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    args = tiny_args(run, char_data, "--train.max_steps=50", "--train.resume=auto", "--model.n_layer=3")
    assert main(["pretrain", *args]) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "n_layer=2 there, 3 now" in err


def test_fp16_guard_on_cpu(tmp_path, char_data, capsys):
    assert main(["pretrain", *tiny_args(tmp_path, char_data, "--train.max_steps=1", "--train.precision=fp16")]) == 2
    assert "fp16 is for GPUs" in capsys.readouterr().err


def test_nan_guard(tmp_path, char_data, capsys):
    # diverged: every step is skipped (non-finite), and with no checkpoint to roll back to the run stops
    assert main(["pretrain", *tiny_args(tmp_path, char_data, "--train.max_steps=8", "--train.lr=1e30",
                                        "--train.grad_clip=0", "--train.warmup_steps=0",
                                        "--train.max_bad_steps=3")]) == 2
    err = capsys.readouterr().err
    assert "3 non-finite steps in a row" in err and "no checkpoint of this run" in err and "lower train.lr" in err
    assert not [t for t in threading.enumerate() if t.name == "gptforge-prefetch"]  # the error stopped it too


@pytest.mark.parametrize("length", ["--train.max_tokens=2560", "--train.epochs=0.01"])
def test_training_length_in_tokens_or_epochs(tmp_path, char_data, length):
    assert main(["pretrain", *tiny_args(tmp_path, char_data, length)]) == 0
    n = len(read_losses(tmp_path))
    if "tokens" in length:
        assert n == 10  # 2560 tokens / (4 x 64 tokens per step)
    else:
        assert n >= 1


def test_auto_keeps_effective_batch(tmp_path, char_data, capsys):
    assert main(["pretrain", *tiny_args(tmp_path, char_data, "--train.max_steps=1", "--train.grad_accum=2",
                                        "--train.auto=true")]) == 0
    out = capsys.readouterr().out
    assert "auto-config for " in out and "micro-batch 8 x accumulation 1" in out  # 4 x 2 fits in one micro-batch on CPU
    assert "training 1 steps x 8 sequences" in out


def test_negative_prefetch_is_one_line(tmp_path, char_data, capsys):
    assert main(["pretrain", *tiny_args(tmp_path, char_data, "--train.max_steps=1", "--train.prefetch=-1")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "config key 'train.prefetch' must be >= 0, got -1" in err, err


def test_missing_and_empty_data(tmp_path, capsys):
    assert main(["pretrain", f"--data.path={tmp_path / 'nope.txt'}", f"--train.out_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "nope.txt" in err, err
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(["pretrain", f"--data.path={empty}", f"--train.out_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and "empty" in err.splitlines()[-1], err


@pytest.mark.slow
def test_compile_matches_eager(tmp_path, char_data):
    eager, comp = tmp_path / "eager", tmp_path / "compiled"
    assert main(["pretrain", *tiny_args(eager, char_data, "--train.max_steps=3")]) == 0
    assert main(["pretrain", *tiny_args(comp, char_data, "--train.max_steps=3", "--train.compile=true")]) == 0
    a, b = read_losses(eager), read_losses(comp)
    assert len(b) == 3 and max(abs(x - y) for x, y in zip(a, b)) < 1e-4, (a, b)
