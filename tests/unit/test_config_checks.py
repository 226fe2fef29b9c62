"""Each config section checks its own values (config.schema: DataSection.check, TrainSection.check, ...) when the
command line is parsed: a bad value is one line naming its key before anything is read, prepared or built (no
data line, no model line, no cache, no out_dir). The validation share has one rule for `prepare --val-fraction`
and data.val_fraction. The data keys SFT and DPO share live in the data section (data.overflow,
data.skip_bad_lines); the old spellings sft.overflow / sft.skip_bad_lines still work on the command line and in a
saved config.json, with a note."""

from __future__ import annotations

import json

import pytest

from conftest import tiny_args
from gptforge.cli import main
from gptforge.config.loader import parse_config
from support.stage_fixtures import reverse_conversations, sft_args, write_jsonl

# (stage, flags, what the one line says): the checks that used to run only once the model existed (in the step
# guard, the stop signals' grace period, the trainer's length, the DPO objective), and the validation share
MOVED = [
    ("pretrain", ["--train.max_bad_steps=0"], "config key 'train.max_bad_steps' must be >= 1, got 0; the number"),
    ("pretrain", ["--train.spike_factor=-1"], "config key 'train.spike_factor' must be >= 0, got -1.0; 0 turns"),
    ("pretrain", ["--train.spike_factor=nan"], "config key 'train.spike_factor' must be a finite number, got nan"),
    ("pretrain", ["--train.grace_s=0"], "config key 'train.grace_s' must be a positive number, got 0.0; the seconds"),
    ("pretrain", ["--train.grace_s=inf"], "config key 'train.grace_s' must be a positive number, got inf"),
    ("pretrain", ["--train.max_steps=5", "--train.max_tokens=1000"],
     "give only one training length, not train.max_steps and train.max_tokens"),
    ("sft", ["--train.max_steps=5", "--train.epochs=1"],
     "give only one training length, not train.max_steps and train.epochs"),
    ("dpo", ["--dpo.beta=0"], "config key 'dpo.beta' must be a positive number, got 0.0"),
    ("dpo", ["--dpo.label_smoothing=0.5"], "config key 'dpo.label_smoothing' must be in [0, 0.5), got 0.5"),
    ("pretrain", ["--data.val_fraction=0.5"], "config key 'data.val_fraction' must be in [0, 0.5), got 0.5"),
]


@pytest.fixture
def raw_inputs(tmp_path, shakespeare_small):
    """Raw inputs each stage would read and prepare first: a text, conversations, pairs."""
    chats = write_jsonl(tmp_path / "chats.jsonl", reverse_conversations(30))
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "ab", "chosen": "ba", "rejected": "ab"}] * 30)
    return {"pretrain": shakespeare_small, "sft": chats, "dpo": pairs}


def _one_line(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err and len(cap.err.strip().splitlines()) == 1, cap.err
    assert cap.out == "", f"something was read or built before the check: {cap.out[-2000:]}"
    return cap.err.strip()


@pytest.mark.parametrize("stage,flags,needle", MOVED, ids=[" ".join(m[1]) for m in MOVED])
def test_bad_value_is_one_line_before_anything_is_built(stage, flags, needle, tmp_path, raw_inputs, capsys,
                                                        monkeypatch):
    cache, out = tmp_path / "cache", tmp_path / "run"
    monkeypatch.setenv("GPTFORGE_CACHE", str(cache))  # raw text would be prepared into it first
    extra = [f"--init-from={tmp_path / 'sft_run'}"] if stage == "dpo" else []
    err = _one_line(capsys, [stage, *tiny_args(out, raw_inputs[stage], *extra, *flags)])
    assert err.startswith("gptforge: error: ") and needle in err, err
    assert not out.exists() and not cache.exists()


def test_val_fraction_one_rule_for_prepare_and_pretrain(tmp_path, shakespeare_small, capsys, monkeypatch):
    """0 is accepted by both (no validation split; pretrain with data.val_fraction=0 trains: test_val_path), 0.5 is
    refused by both with the same words after the name."""
    text = tmp_path / "t.txt"
    text.write_text(shakespeare_small.read_text()[:20_000])
    assert main(["prepare", "--input", str(text), "--out", str(tmp_path / "p0"), "--val-fraction", "0",
                 "--no-progress"]) == 0
    meta = json.loads((tmp_path / "p0" / "meta.json").read_text())
    assert meta["val_fraction"] == 0 and meta["splits"]["val"] == 0 and meta["splits"]["train"] > 10_000
    prep = _one_line(capsys, ["prepare", "--input", str(text), "--out", str(tmp_path / "p5"), "--val-fraction", "0.5"])
    assert not (tmp_path / "p5").exists()
    monkeypatch.setenv("GPTFORGE_CACHE", str(tmp_path / "cache"))
    pre = _one_line(capsys, ["pretrain", *tiny_args(tmp_path / "run", text, "--train.max_steps=1",
                                                    "--data.val_fraction=0.5")])
    assert prep == "gptforge: error: --val-fraction must be in [0, 0.5), got 0.5; e.g. 0.01 (0: no validation split)"
    assert pre == ("gptforge: error: config key 'data.val_fraction' must be in [0, 0.5), got 0.5; e.g. 0.01 "
                   "(0: no validation split)")


def _sft_data_line(out: str) -> str:
    return next(line for line in out.splitlines() if line.startswith("sft data:"))


def test_old_sft_data_keys_still_work_on_the_command_line_and_in_a_saved_config(tmp_path, capsys):
    convs = reverse_conversations(12)
    convs[3] = {"messages": [{"role": "user", "content": "abcd"}, {"role": "assistant", "content": "dcba" * 30}]}
    data = write_jsonl(tmp_path / "chats.jsonl", convs)
    data.write_text(data.read_text() + "{not json\n")
    base = ["--data.tokenizer=char", "--train.max_steps=1", "--train.micro_batch=2"]
    assert main(["sft", *sft_args(tmp_path / "a", data, *base, "--sft.overflow=drop",
                                  "--sft.skip-bad-lines=true")]) == 0
    cap = capsys.readouterr()
    note = "note: sft.overflow is now data.overflow; sft.skip_bad_lines is now data.skip_bad_lines"
    assert [line for line in cap.err.splitlines() if line.startswith("note:")] == [note], cap.err
    line = _sft_data_line(cap.out)
    assert "12 conversations -> 11 examples; 0 truncated, 1 dropped as too long" in line, line
    assert "1 malformed lines skipped" in line, line
    saved = json.loads((tmp_path / "a" / "config.json").read_text())
    assert (saved["data"]["overflow"], saved["data"]["skip_bad_lines"]) == ("drop", True)
    assert "overflow" not in saved["sft"] and "skip_bad_lines" not in saved["sft"]

    # the config.json of a run from before the move: the keys in the sft section
    saved["sft"] |= {"overflow": saved["data"].pop("overflow"), "skip_bad_lines": saved["data"].pop("skip_bad_lines")}
    old = tmp_path / "old_config.json"
    old.write_text(json.dumps(saved))
    cfg = parse_config(["--config", str(old)])
    assert (cfg.data.overflow, cfg.data.skip_bad_lines) == ("drop", True)
    capsys.readouterr()
    assert main(["sft", "--config", str(old), f"--train.out_dir={tmp_path / 'b'}"]) == 0
    cap = capsys.readouterr()
    assert [line for line in cap.err.splitlines() if line.startswith("note:")] == [note], cap.err
    assert _sft_data_line(cap.out) == line
    # the new spelling: no note; the other value of the key changes the counts
    assert main(["sft", *sft_args(tmp_path / "c", data, *base, "--data.skip_bad_lines=true")]) == 0
    cap = capsys.readouterr()
    assert "note:" not in cap.err
    assert "12 conversations -> 12 examples; 1 truncated, 0 dropped as too long" in _sft_data_line(cap.out)


def test_dpo_reads_data_overflow(tmp_path, trained_run, capsys):
    pairs = [{"prompt": "ab", "chosen": "ba", "rejected": "bb"}] * 6 + [{"prompt": "ab", "chosen": "b" * 100,
                                                                          "rejected": "c"}]
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    for overflow, counts in (("drop", "7 pairs -> 6 examples; 0 truncated, 1 dropped as too long"),
                             ("truncate", "7 pairs -> 7 examples; 1 truncated, 0 dropped as too long")):
        assert main(["dpo", *sft_args(tmp_path / overflow, data, f"--init-from={trained_run}", "--train.max_steps=1",
                                      "--train.micro_batch=2", f"--data.overflow={overflow}")]) == 0
        line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("dpo data:"))
        assert counts in line, line
