"""`gptforge bench --to-loss`: the interpolation on synthetic curves (exact numbers), the equal-token loss, the
baseline's curve file, the trainer's training seconds leaving evaluation and saving out (a fake clock), and one
real invocation with two recipes whose rows are reproduced by their printed commands."""

from __future__ import annotations

import json
import math
import shlex
import types

import pytest

from conftest import tiny_args
from gptforge.bench.to_loss import loss_at_tokens, pool, reach, read_baseline, schedule, summarize
from gptforge.cli import main
from gptforge.errors import UserError
from gptforge.train import checkpointing as checkpointing_mod, metrics as metrics_mod, trainer as trainer_mod

CURVE = [(100, 1.0, 3.0, 10), (200, 2.0, 2.0, 20), (300, 3.0, 1.5, 30)]


def test_reach_interpolates_between_the_bracketing_evaluations():
    assert reach(CURVE, 2.5) == {"tokens": 150.0, "seconds": 1.5, "steps": 15.0, "at_first_eval": False}
    assert reach(CURVE, 1.75) == {"tokens": 250.0, "seconds": 2.5, "steps": 25.0, "at_first_eval": False}
    # hit exactly at an evaluation: that evaluation's numbers
    assert reach(CURVE, 2.0) == {"tokens": 200.0, "seconds": 2.0, "steps": 20.0, "at_first_eval": False}
    assert reach(CURVE, 1.5)["tokens"] == 300.0
    assert reach(CURVE, 1.4999) is None  # never reached
    # at or below the target at the first evaluation: that evaluation (an upper bound)
    assert reach(CURVE, 3.5) == {"tokens": 100, "seconds": 1.0, "steps": 10, "at_first_eval": True}
    assert reach(CURVE, 3.0)["at_first_eval"] is True
    # not monotone: the first crossing (between the 1st and 2nd evaluation), not the later one (3rd to 4th)
    wavy = [(100, 1.0, 3.0), (200, 2.0, 1.8), (300, 3.0, 2.4), (400, 4.0, 1.0)]
    got = reach(wavy, 2.0)
    assert got["tokens"] == pytest.approx(100 + 100 * (1.0 / 1.2), abs=1e-12)
    assert got["seconds"] == pytest.approx(1.0 + 1.0 / 1.2, abs=1e-12) and got["steps"] is None
    assert reach(wavy, 1.2)["tokens"] == pytest.approx(300 + 100 * (1.2 / 1.4), abs=1e-12)


def test_loss_at_tokens_and_pooling_rounds():
    assert loss_at_tokens(CURVE, 250) == 1.75 and loss_at_tokens(CURVE, 200) == 2.0
    assert loss_at_tokens(CURVE, 100) == 3.0 and loss_at_tokens(CURVE, 300) == 1.5
    assert loss_at_tokens(CURVE, 50) is None and loss_at_tokens(CURVE, 301) is None
    other = [(100, 3.0, 3.2, 10), (200, 4.0, 2.2, 20), (300, 9.0, 1.7, 30)]
    third = [(100, 2.0, 3.1, 10), (200, 3.0, 2.1, 20)]  # a round that stopped early: common evaluations only
    assert pool([CURVE, other, third]) == [(100, 2.0, pytest.approx(3.1), 10), (200, 3.0, pytest.approx(2.1), 20)]
    assert schedule(["A", "B", "C"], 2) == [("A", 1), ("B", 1), ("C", 1), ("C", 2), ("B", 2), ("A", 2)]


def test_summarize_targets_ratios_and_equal_tokens():
    fast = [(100, 0.5, 2.8, 10), (200, 1.0, 1.6, 20), (250, 1.25, 1.4, 25)]
    slow = [(100, 2.0, 3.5, 10), (200, 4.0, 3.0, 20)]
    rows, equal = summarize([{"name": "A", "curve": CURVE}, {"name": "B", "curve": fast},
                             {"name": "C", "curve": slow}], target=CURVE[-1][2])
    a, b, c = rows
    assert equal == 200  # the smallest final token count
    assert (a["seconds_to_target"], a["tokens_to_target"], a["ratio_seconds"]) == (3.0, 300.0, 1.0)
    # B: 1.6 at 200 tokens, 1.4 at 250: reaches 1.5 half way
    assert b["tokens_to_target"] == pytest.approx(225) and b["seconds_to_target"] == pytest.approx(1.125)
    assert b["steps_to_target"] == pytest.approx(22.5) and b["ratio_seconds"] == pytest.approx(1.125 / 3.0)
    assert b["ratio_tokens"] == pytest.approx(225 / 300)
    assert not c["reached"] and c["seconds_to_target"] is None and c["ratio_seconds"] is None
    assert (a["loss_at_equal_tokens"], b["loss_at_equal_tokens"], c["loss_at_equal_tokens"]) == (2.0, 1.6, 3.0)
    assert (a["final_loss"], b["final_tokens"], c["final_steps"]) == (1.5, 250, 20)


def test_baseline_json(tmp_path):
    p = tmp_path / "nanogpt.json"
    p.write_text(json.dumps({"name": "nanogpt", "val_curve": [[100, 1.5, 3.0], [200, 3.0, 2.0]],
                             "peak_memory_bytes": 123, "command": "python train.py config/x.py"}))
    b = read_baseline(str(p))
    assert b == {"name": "nanogpt", "curve": [(100, 1.5, 3.0), (200, 3.0, 2.0)], "peak_memory_bytes": 123,
                 "command": "python train.py config/x.py"}
    rows, _ = summarize([{"name": b["name"], "curve": b["curve"]}, {"name": "A", "curve": CURVE}], target=2.0)
    assert rows[0]["seconds_to_target"] == 3.0 and rows[0]["steps_to_target"] is None
    assert rows[1]["ratio_seconds"] == pytest.approx(2.0 / 3.0)
    for text, why in (("{", "not JSON"), ('{"val_curve": []}', "no usable val_curve"),
                      ('{"val_curve": [[200, 1, 2.0], [100, 2, 1.0]]}', "no usable val_curve"),
                      ('{"val_curve": [[100, 1, "x"]]}', "no usable val_curve")):
        p.write_text(text)
        with pytest.raises(UserError, match=why) as e:
            read_baseline(str(p))
        assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="cannot read"):
        read_baseline(str(tmp_path / "missing.json"))


class FakeClock:
    """time.perf_counter for the trainer: 0.5 s a call; evaluating takes 100 s and a checkpoint save 1000 s."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        self.now += 0.5
        return self.now


def test_training_seconds_leave_out_evaluation_and_saving_and_survive_a_resume(tmp_path, char_data, monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(metrics_mod, "time", types.SimpleNamespace(perf_counter=clock.perf_counter, time=lambda: 0.0))
    evaluate, save = trainer_mod.Trainer.evaluate, checkpointing_mod.CheckpointManager.save

    def slow_evaluate(self):
        clock.now += 100
        return evaluate(self)

    def slow_save(self, *a, **kw):
        path = save(self, *a, **kw)
        clock.now += 1000  # the writing, after the state (and its train_s) was taken
        return path

    monkeypatch.setattr(trainer_mod.Trainer, "evaluate", slow_evaluate)
    monkeypatch.setattr(checkpointing_mod.CheckpointManager, "save", slow_save)
    out = tmp_path / "run"
    args = tiny_args(out, char_data, "--train.max_steps=6", "--train.eval_every=2", "--train.save_every=2",
                     "--train.log_every=1")
    assert main(["pretrain", *args, "--train.stop_after=4"]) == 0
    assert main(["pretrain", *args, "--train.resume=auto"]) == 0
    rows = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "val/loss" in r]
    assert [r["step"] for r in rows] == [2, 4, 6]
    secs = [r["train/seconds"] for r in rows]
    # without leaving them out, the step-4 value would hold an evaluation (100) and a save (1000) more
    assert 0 < secs[0] < secs[1] < secs[0] + 50 and secs[1] < secs[2] < secs[1] + 50, secs
    state = json.loads((out / "checkpoints" / "step_0000004" / "trainer_state.json").read_text())
    assert secs[1] <= state["train_s"] < secs[1] + 50  # carried across the resume
    assert [r["train/tokens"] for r in rows] == [2 * 4 * 64, 4 * 4 * 64, 6 * 4 * 64]


def test_to_loss_end_to_end(tmp_path, char_data, shakespeare_small, capsys, monkeypatch):
    val = tmp_path / "val.txt"
    val.write_text(shakespeare_small.read_text(encoding="utf-8")[-3000:], encoding="utf-8")
    micro = ["--model.n_layer=1", "--model.d_model=32", "--model.n_head=2", "--model.d_ff=64",
             "--model.block_size=32", "--train.warmup_steps=2"]
    out = tmp_path / "to_loss.json"
    capsys.readouterr()
    assert main(["bench", "--to-loss", "", "--train.lr=1e-2 train.seed=7", "--data", str(char_data),
                 "--val-path", str(val), "--steps", "30", "--warmup", "2", "--eval-every", "10",
                 "--micro-batch", "4", "--threads", "1", "--json", str(out), "--", *micro]) == 0
    printed = capsys.readouterr().out
    d = json.loads(out.read_text())
    a, b = d["rows"]
    assert (a["name"], b["name"]) == ("A", "B") and d["order"] == ["A1", "B1"]
    assert d["target_loss"] == a["final_loss"] == a["val_curve"][-1][2]  # the baseline's final val loss
    assert d["equal_tokens"] == 30 * 4 * 32
    for r in (a, b):
        assert [p[0] for p in r["val_curve"]] == [10 * 128, 20 * 128, 30 * 128]  # steps x micro-batch x context
        assert [p[3] for p in r["val_curve"]] == [10, 20, 30]
        for k in ("final_loss", "loss_at_equal_tokens", "final_seconds", "peak_memory_bytes"):
            assert math.isfinite(r[k]) and r[k] > 0, (k, r)
        assert r["val_curve"][0][1] < r["val_curve"][1][1] < r["val_curve"][2][1]
    assert a["reached"] and 20 < a["steps_to_target"] <= 30 and a["ratio_seconds"] == 1.0
    assert b["final_loss"] != a["final_loss"]  # another recipe, another curve
    if b["reached"]:
        assert b["ratio_seconds"] == pytest.approx(b["seconds_to_target"] / a["seconds_to_target"])
    lines = {ln.split()[0]: ln for ln in printed.splitlines() if ln[:2] in ("A ", "B ")}
    assert lines["A"].rstrip().endswith("(defaults)") and lines["B"].rstrip().endswith("--train.lr=1e-2 train.seed=7")
    # the printed command trains B again with the same curve
    cmd = next(ln for ln in printed.splitlines() if ln.startswith("B: "))[3:]
    assert cmd == b["command"] and "--train.lr=1e-2" in cmd and "--train.eval_every=10" in cmd
    argv = shlex.split(cmd)
    assert argv[:3] == ["OMP_NUM_THREADS=1", "gptforge", "pretrain"]
    monkeypatch.chdir(tmp_path)
    assert main(argv[2:]) == 0
    again = [r for r in map(json.loads, (tmp_path / "runs/to_loss/B/metrics.jsonl").read_text().splitlines())
             if "val/loss" in r]
    assert [r["val/loss"] for r in again] == pytest.approx([p[2] for p in b["val_curve"]], abs=1e-4)


def test_to_loss_mistakes_are_one_line(capsys):
    for argv, words in ((["--to-loss", ""], "two or more recipes"),
                        (["--to-loss", "", "train.lr=1e-3 --stepz 3"], "recipe 2 (train.lr=1e-3 --stepz 3): unknown "
                                                                     "config key 'stepz'"),
                        (["--to-loss", "", "", "--eval-every", "0"], "--eval-every must be at least 1"),
                        (["--target-loss", "2.0"], "--target-loss goes with --to-loss"),
                        (["--to-loss", "", "", "--compare", "a", "b"], "leave out --compare")):
        capsys.readouterr()
        assert main(["bench", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and words in err, err
