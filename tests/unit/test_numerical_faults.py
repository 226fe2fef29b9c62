"""Numerical faults: a non-finite step is skipped (no update) and counted; K in a row roll back to the last
checkpoint (or stop); loss spikes are counted. Faults come from GPTFORGE_INJECT_NAN_AT_STEP (train/faults.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import read_losses, tiny_args
from gptforge.checkpoint import STATE_FILE
from gptforge.cli import main
from support.checks import assert_same_weights, one_line_error, tree_digest


OPTIMIZERS = {"adamw": [], "muon": ["--train.optimizer=muon"]}  # muon: its own step skipped on the device too


def state(run: Path, step: int) -> dict:
    return json.loads((run / "checkpoints" / f"step_{step:07d}" / STATE_FILE).read_text())


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_injected_nan_is_skipped_counted_and_equals_a_run_without_that_update(tmp_path, char_data, monkeypatch, capsys,
                                                                             optimizer):
    n = ["--train.max_steps=6", *OPTIMIZERS[optimizer]]
    monkeypatch.setenv("GPTFORGE_INJECT_NAN_AT_STEP", "3")
    nan_run = tmp_path / "nan"
    assert main(["pretrain", *tiny_args(nan_run, char_data, *n, "--train.log_every=1")]) == 0
    err = capsys.readouterr().err
    assert "step 3: loss nan" in err and "update skipped (1 in a row" in err
    assert state(nan_run, 6)["bad_steps"] == 1
    rows = [json.loads(x) for x in (nan_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/bad_steps"] for r in rows if "train/bad_steps" in r] == [0, 0, 1, 1, 1, 1]
    monkeypatch.delenv("GPTFORGE_INJECT_NAN_AT_STEP")
    # the reference: the model and optimizer of step 2 with the data position of step 3 (its batch consumed,
    # no update), trained on to step 6
    two, three = tmp_path / "two", tmp_path / "three"
    assert main(["pretrain", *tiny_args(two, char_data, *n, "--train.stop_after=2")]) == 0
    assert main(["pretrain", *tiny_args(three, char_data, *n, "--train.stop_after=3")]) == 0
    ck2, ck3 = two / "checkpoints/step_0000002", three / "checkpoints/step_0000003"
    for f in list(ck3.glob("*.distcp")) + [ck3 / ".metadata"]:
        f.unlink()
    for f in list(ck2.glob("*.distcp")) + [ck2 / ".metadata"]:
        shutil.copy(f, ck3 / f.name)
    assert main(["pretrain", *tiny_args(three, char_data, *n, "--train.resume=auto")]) == 0
    assert read_losses(three)[3:] == read_losses(nan_run)[3:]  # steps 4..6 bit for bit
    assert_same_weights(nan_run / "checkpoints/step_0000006", three / "checkpoints/step_0000006")


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_k_bad_steps_in_a_row_roll_back_to_the_last_checkpoint(tmp_path, char_data, monkeypatch, capsys, optimizer):
    args = ["--train.max_steps=8", "--train.save_every=4", "--train.keep_last=3", *OPTIMIZERS[optimizer]]
    ref = tmp_path / "ref"
    assert main(["pretrain", *tiny_args(ref, char_data, *args)]) == 0
    monkeypatch.setenv("GPTFORGE_INJECT_NAN_AT_STEP", "5,6")  # transient: the replayed steps 5, 6 are clean
    run = tmp_path / "run"
    capsys.readouterr()
    assert main(["pretrain", *tiny_args(run, char_data, *args, "--train.max_bad_steps=2")]) == 0
    err = capsys.readouterr().err
    assert f"rolled back to step 4 ({run / 'checkpoints/step_0000004'}) after 2 non-finite steps in a row from step 5" in err
    assert state(run, 8)["bad_steps"] == 2
    assert_same_weights(run / "checkpoints/step_0000008", ref / "checkpoints/step_0000008")
    good = [x for x in read_losses(run) if x == x]  # the two NaN steps, then steps 5..8 again
    assert good == read_losses(ref)


def test_on_bad_steps_stop_is_one_line_and_keeps_checkpoints(tmp_path, char_data, monkeypatch, capsys):
    run = tmp_path / "run"
    args = ["--train.max_steps=8", "--train.save_every=2", "--train.max_bad_steps=2", "--train.on_bad_steps=stop"]
    monkeypatch.setenv("GPTFORGE_INJECT_NAN_AT_STEP", "3,4")
    assert main(["pretrain", *tiny_args(run, char_data, *args)]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "2 non-finite steps in a row (to step 4)" in line and "train.on_bad_steps=stop" in line
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_0000002"]
    before = tree_digest(run / "checkpoints")
    monkeypatch.delenv("GPTFORGE_INJECT_NAN_AT_STEP")
    assert main(["pretrain", *tiny_args(run, char_data, *args, "--train.resume=auto")]) == 0
    assert f"resumed from {run / 'checkpoints/step_0000002'} at step 2" in capsys.readouterr().out
    assert state(run, 8)["step"] == 8 and before  # the kept step 2 was the resume's start


def test_loss_spikes_are_warned_and_counted(tmp_path, char_data, capsys):
    # spike_factor 0.5: every loss above half the running median counts, from the 11th step on
    run = tmp_path / "run"
    assert main(["pretrain", *tiny_args(run, char_data, "--train.max_steps=14", "--train.spike_factor=0.5")]) == 0
    assert state(run, 14)["loss_spikes"] == 4
    assert capsys.readouterr().err.count("loss spike") == 4


def test_bad_fault_settings_are_one_line(tmp_path, char_data, capsys):
    assert main(["pretrain", *tiny_args(tmp_path, char_data, "--train.max_steps=2", "--train.max_bad_steps=0")]) == 2
    assert "train.max_bad_steps" in one_line_error(capsys.readouterr().err)
    assert not (tmp_path / "checkpoints").exists()
