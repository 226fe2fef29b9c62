"""A resume trains on with the settings the run started with (config.loader.restore_recipe): the checkpoint's
recipe and model keys win over today's defaults, the command line wins over both, and a key a checkpoint predates
takes the behaviour from before the key existed."""

import json

import pytest

from conftest import read_losses, tiny_args
from gptforge.checkpoint import list_checkpoints
from gptforge.cli import main
from gptforge.config.loader import explicit_keys, parse_config, restore_recipe
from gptforge.errors import UserError
from gptforge.train.recipes import Pretrain

RECIPE = ["--train.lr=5e-3", "--train.warmup_steps=3", "--train.schedule=constant", "--train.beta2=0.95",
          "--train.weight_decay=0.05", "--model.dropout=0.1"]


def without(args, *prefixes):
    return [a for a in args if not a.startswith(prefixes)]


def test_resume_without_the_recipe_flags_is_exact(tmp_path, char_data, capsys):
    full, split = tmp_path / "full", tmp_path / "split"
    assert main(["pretrain", *tiny_args(full, char_data, "--train.max_steps=16", *RECIPE)]) == 0
    assert main(["pretrain", *tiny_args(split, char_data, "--train.max_steps=16", "--train.save_every=8",
                                        "--train.stop_after=8", *RECIPE)]) == 0
    capsys.readouterr()
    # resumed with none of the recipe flags (not even tiny_args' lr and warmup): the checkpoint's values are used
    bare = without(tiny_args(split, char_data, "--train.max_steps=16", "--train.resume=auto"),
                   "--train.lr=", "--train.warmup_steps=")
    assert main(["pretrain", *bare]) == 0
    out = capsys.readouterr().out
    assert "resume: the run's own settings from step_0000008/config.json" in out
    for key in ("train.lr=0.005", "train.schedule='constant'", "train.warmup_steps=3", "model.dropout=0.1"):
        assert key in out, (key, out)
    a, b = read_losses(full), read_losses(split)
    assert len(a) == len(b) == 16 and a == b  # bitwise: the same schedule, betas, decay and dropout


def test_command_line_wins_and_missing_keys_take_the_old_behaviour(tmp_path, char_data):
    run = tmp_path / "run"
    assert main(["pretrain", *tiny_args(run, char_data, "--train.max_steps=4", *RECIPE)]) == 0
    ck = list_checkpoints(run)[-1]
    saved = json.loads((ck / "config.json").read_text())
    # as if written before train.schedule and train.optimizer existed: the keys' own defaults (the behaviour before
    # them: cosine, AdamW), not the preset's recipe of today (WSD, Muon)
    del saved["train"]["schedule"], saved["train"]["optimizer"]
    argv = ["--train.lr=1e-3", "--train.beta2=0.9", "--out", str(run)]
    cfg = parse_config(argv, Pretrain.defaults)
    assert (cfg.train.schedule, cfg.train.optimizer) == ("wsd", "muon")  # a new run: the preset's recipe
    assert {"train.lr", "train.beta2", "train.out_dir"} <= cfg.explicit
    changed = restore_recipe(cfg, saved, "test")
    assert cfg.train.lr == 1e-3 and cfg.train.beta2 == 0.9  # given now: kept
    assert cfg.train.warmup_steps == 3 and cfg.train.weight_decay == 0.05  # from the checkpoint
    assert cfg.train.schedule == "cosine" and "train.schedule='cosine'" in changed
    assert cfg.train.optimizer == "adamw" and "train.optimizer='adamw'" in changed
    assert cfg.train.out_dir == str(run) and cfg.train.max_steps is None  # not recipe keys: untouched


def test_explicit_keys_reads_flags_aliases_and_stops_at_double_dash():
    keys = explicit_keys(["--train.max-steps=3", "--out", "x", "--compile", "--model.preset", "nano", "--",
                          "--train.lr=1"])
    assert keys == {"train.max_steps", "train.out_dir", "train.compile", "model.preset"}


@pytest.mark.parametrize("bad, msg", [
    ({"train": {"lr": "fast"}}, "train.lr='fast' is not a float"),
    ({"train": {"warmup_steps": -4}}, "train.warmup_steps"),
    ({"train": [1, 2]}, "section 'train' is not a table"),
    ({"model": {"n_layer": 10**9 + 0.5}}, "model.n_layer"),
])
def test_a_strangers_config_is_one_line(bad, msg):
    cfg = parse_config([])
    with pytest.raises(UserError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        restore_recipe(cfg, bad, "checkpoint 'x'")
