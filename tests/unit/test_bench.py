"""`gptforge bench`: options, the pretrain command of each run, the table (the runs themselves are slow)."""

from pathlib import Path

from gptforge.bench.local import format_table
from gptforge.bench.options import BenchOptions, pretrain_args
from gptforge.cli import main
from gptforge.options import parse_options


def test_options_and_pretrain_args_pass_through_after_dashes():
    opts = parse_options(BenchOptions, ["--modes", "single,ddp", "--micro-batch", "4", "--block-size", "32", "--",
                                        "--model.preset=nano", "--train.seed=3"], "gptforge bench")
    assert opts.modes == "single,ddp" and opts.micro_batch == 4
    assert opts.pretrain == ["--model.preset=nano", "--train.seed=3"]
    args = pretrain_args(opts, Path("/tmp/x"))
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


def test_nodes_settings_table_and_errors(capsys, monkeypatch):
    from gptforge.bench import nodes

    assert nodes.parse_settings("ddp, sync8") == ["ddp", "sync8"]
    assert nodes.SETTINGS["sync8"] == ["--parallel.strategy=ddp", "--parallel.sync_every=8"]
    base = {"step_ms": 5000.0, "mean_ms": 5000.0, "final_loss": 2.5}
    rows = [{"setting": "ddp", "options": "--parallel.strategy=ddp", "step_ms": 9000.0, "mean_ms": 9500.0,
             "final_loss": 2.5},
            {"setting": "bf16", "options": "--parallel.strategy=ddp --parallel.grad_compression=bf16",
             "step_ms": 6500.0, "mean_ms": 7500.0, "final_loss": 2.525},
            {"setting": "sync8", "options": "", "error": "node 0 exit 2: gptforge: error: unknown key"}]
    table = nodes.format_table(base, rows).splitlines()
    assert table[0].split()[:11] == ["setting", "median", "ms", "vs", "compute", "mean", "ms", "vs", "compute",
                                     "final", "loss"]
    assert table[1].split()[:6] == ["compute", "5000.0", "1.00x", "5000.0", "1.00x", "2.5000"]
    assert table[2].split()[:7] == ["ddp", "9000.0", "1.80x", "9500.0", "1.90x", "2.5000", "+0.0%"]
    assert table[3].split()[:7] == ["bf16", "6500.0", "1.30x", "7500.0", "1.50x", "2.5250", "+1.0%"]
    assert table[4] == "sync8      failed: node 0 exit 2: gptforge: error: unknown key"
    assert nodes.error_line("a\n[rank0]: gptforge: error: no such key --parallel.sync_every\nb\n") == \
        "[rank0]: gptforge: error: no such key --parallel.sync_every"
    assert main(["bench", "--nodes", "2", "--settings", "ddp,tp"]) == 2
    assert "unknown bench setting(s) tp; choose from ddp, bf16" in capsys.readouterr().err
    assert main(["bench", "--nodes", "3"]) == 2
    assert "--nodes 3: bench runs on this machine (1) or on two namespace nodes (2)" in capsys.readouterr().err
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    assert main(["bench", "--nodes", "2", "--rate", "100mbit"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["gptforge: error: bench --nodes 2 starts two network namespaces: network namespaces need root "
                   "(run as root, e.g. in a container)"]
