"""`gptforge bench`: options, the pretrain command of each run, the table (the runs themselves are slow)."""

from pathlib import Path

from gptforge.bench import BenchOptions, _pretrain_args, format_table
from gptforge.cli import main
from gptforge.options import parse_options


def test_options_and_pretrain_args_pass_through_after_dashes():
    opts = parse_options(BenchOptions, ["--modes", "single,ddp", "--micro-batch", "4", "--block-size", "32", "--",
                                        "--model.preset=nano", "--train.seed=3"], "gptforge bench")
    assert opts.modes == "single,ddp" and opts.micro_batch == 4
    assert opts.pretrain == ["--model.preset=nano", "--train.seed=3"]
    args = _pretrain_args(opts, Path("/tmp/x"))
    assert "--parallel.timeout_s=120" in args and "--model.block_size=32" in args and "--train.micro_batch=4" in args
    assert args[-2:] == ["--model.preset=nano", "--train.seed=3"]  # after ours: they win


def test_table_and_user_errors(capsys):
    rows = [{"mode": "single", "nproc": 1, "threads": 2, "step_ms": 100.0, "seqs_per_step": 8},
            {"mode": "ddp", "nproc": 2, "threads": 1, "step_ms": 125.0, "seqs_per_step": 16}]
    table = format_table(rows).splitlines()
    assert table[1].split() == ["single", "1", "2", "8", "100.0", "1.00x", "100%"]
    assert table[2].split() == ["ddp", "2", "1", "16", "125.0", "1.25x", "80%"]
    assert main(["bench", "--modes", "single,tp"]) == 2
    assert "unknown bench mode(s) tp" in capsys.readouterr().err
    assert main(["bench", "--steps", "5", "--warmup", "5"]) == 2
    assert "must be larger than --warmup" in capsys.readouterr().err
