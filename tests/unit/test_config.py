from pathlib import Path

import pytest

from gptforge.cli import main
from gptforge.config.loader import load_file, parse_config, resolve_model
from gptforge.errors import UserError

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.*"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = parse_config(["--config", str(path)])
    raw = load_file(path)
    for section, values in raw.items():
        for key, value in values.items():
            got = getattr(getattr(cfg, section), key)
            assert got == value or float(got) == float(value), (section, key)
    assert cfg.model.preset == raw.get("model", {}).get("preset", "nano")
    mcfg = resolve_model(cfg.model, 300)
    assert mcfg.n_layer > 0


def test_dotted_overrides_and_types():
    cfg = parse_config(["--train.max_steps=200", "--model.preset=tiny", "--data.path", "a.txt,b.txt",
                        "--train.compile=true", "--train.lr=3e-4", "--init-from=ckpt"])
    assert (cfg.train.max_steps, cfg.model.preset, cfg.data.path) == (200, "tiny", "a.txt,b.txt")
    assert cfg.train.compile is True and cfg.train.lr == 3e-4 and cfg.train.init_from == "ckpt"
    assert parse_config(["--auto"]).train.auto is True and parse_config([]).train.auto is False
    mcfg = resolve_model(cfg.model, 50257)
    assert (mcfg.n_layer, mcfg.d_model, mcfg.vocab_size) == (8, 512, 50304)


@pytest.mark.parametrize("argv,needle", [
    (["--train.max_step=5"], "unknown config key 'train.max_step' on the command line; did you mean 'train.max_steps'?"),
    (["--trian.lr=1"], "did you mean 'train.lr'?"),
    (["--train.max_steps=abc"], "config key 'train.max_steps' expects int, got 'abc'"),
    (["--train.precision=fp8"], "must be one of 'auto', 'fp32', 'bf16', 'fp16'"),
    (["--model.preset=nanoo"], "did you mean 'nano'?"),
    (["--config", "nope.toml"], "config file 'nope.toml' not found"),
    (["max_steps=5"], "unexpected argument 'max_steps=5'"),
])
def test_bad_config_is_one_line(argv, needle, capsys):
    assert main(["pretrain", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and err.count("\n") == 0, err


def test_bad_key_in_file(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[train]\nmax_stepz = 3\n")
    with pytest.raises(UserError, match=f"unknown config key 'train.max_stepz' in {f}; did you mean 'train.max_steps'"):
        parse_config(["--config", str(f)])
    f.write_text("[train]\nmax_steps = 'many'\n")
    with pytest.raises(UserError, match="expects int"):
        parse_config(["--config", str(f)])


def test_vocab_larger_than_model():
    cfg = parse_config(["--model.vocab_size=64"])
    with pytest.raises(UserError, match="tokenizer has 100 tokens but model.vocab_size is 64"):
        resolve_model(cfg.model, 100)


def test_help_lists_keys(capsys):
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    assert "train.max_steps" in capsys.readouterr().out


_PY310 = r"""
import sys
sys.modules["tomllib"] = None          # Python 3.10 has no tomllib: importing it fails
sys.version_info = (3, 10, 14, "final", 0)
from gptforge.config.loader import parse_config
cfg = parse_config(["--config", sys.argv[1]])
print(cfg.train.max_steps, cfg.model.preset)
"""


def test_toml_config_loads_without_tomllib(tmp_path):
    """The package declares Python >= 3.10, which has no tomllib: TOML files are read with tomli there."""
    import subprocess
    import sys

    f = tmp_path / "c.toml"
    f.write_text('[train]\nmax_steps = 7\n[model]\npreset = "micro"\n')
    r = subprocess.run([sys.executable, "-c", _PY310, str(f)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["7", "micro"]
