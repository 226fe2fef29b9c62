"""A model folder from elsewhere whose small config.json / model_config.json asks for absurd sizes (issue 22,
row 3). Before: `n_layer=10**6` made eval and generate grow to 2.6-4 GB and on, `n_embd=65536` a raw RuntimeError
traceback. Now the config is checked against the weight files' headers (layers, every tensor's shape, on the
meta device) and its size against the memory there is, before anything is allocated: a one-line error, run
under a 2 GiB address-space limit so that a regression fails fast instead of eating the machine."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
from support.checks import one_line_error, run_gptforge

from gptforge.checkpoint import save_checkpoint
from gptforge.cli import main
from gptforge.data.tokenizer import train_bpe
from gptforge.model.gpt import GPTConfig, build_model
from gptforge.parallel.mesh import DistEnv

TEXT = "the quick brown fox jumps over the lazy dog. "


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """A tiny gptforge run (2 layers, width 32) and its Hugging Face export."""
    root = tmp_path_factory.mktemp("absurd")
    tok = train_bpe([TEXT * 3] * 20, 280)
    cfg = GPTConfig(arch="llama", vocab_size=320, block_size=16, n_layer=2, n_head=2, n_kv_head=2, d_model=32,
                    d_ff=64)
    with tempfile.TemporaryDirectory() as d:
        tok.save(d)
        files = {f.name: f.read_bytes() for f in Path(d).iterdir()}
    files["model_config.json"] = json.dumps(cfg.to_dict())
    files["config.json"] = json.dumps({"model": {"preset": "test"}})
    ck = save_checkpoint(root / "run", 3, build_model(cfg, seed=0).eval(), None, {"step": 3}, DistEnv(), files)
    assert main(["export-hf", "--checkpoint", str(ck), "--out", str(root / "hf")]) == 0
    (root / "text.txt").write_text(TEXT * 4)
    return {"gptforge": ck, "hf": root / "hf", "text": root / "text.txt"}


def _altered(folders, form: str, tmp_path: Path, **change) -> Path:
    """A copy of the checkpoint (model_config.json) or the export (config.json) with `change` in its config."""
    keys = {"gptforge": {"layers": "n_layer", "width": "d_model"},
            "hf": {"layers": "num_hidden_layers", "width": "hidden_size"}}[form]
    dst = tmp_path / form
    shutil.copytree(folders[form], dst)
    name = "model_config.json" if form == "gptforge" else "config.json"
    conf = json.loads((dst / name).read_text())
    conf.update({keys[k]: v for k, v in change.items()})
    if "head_dim" in conf and "width" in change:  # the export states it: keep hidden_size / heads
        conf["head_dim"] = change["width"] // conf["num_attention_heads"]
    (dst / name).write_text(json.dumps(conf))
    return dst


def _command(command: str, folder: Path, text: Path) -> list[str]:
    if command == "eval":
        return ["eval", "--checkpoint", str(folder), "--text", str(text), "--device", "cpu", "--out",
                str(folder.parent / "eval.json")]
    return ["generate", "--checkpoint", str(folder), "--max-new-tokens", "4", "--device", "cpu"]


@pytest.mark.parametrize("form", ["gptforge", "hf"])
@pytest.mark.parametrize("command,change,says", [
    ("eval", {"layers": 10**6}, "asks for 1,000,000 layers but its weights hold 2"),
    ("generate", {"width": 65536}, "more than the"),
])
def test_absurd_config_is_one_line_error_before_allocating(folders, tmp_path, form, command, change, says):
    folder = _altered(folders, form, tmp_path, **change)
    r = run_gptforge(*_command(command, folder, folders["text"]), timeout=120)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    line = one_line_error(r.stderr)
    assert says in line and str(folder) in line and len(line) < 400, line


@pytest.mark.parametrize("form", ["gptforge", "hf"])
def test_config_that_disagrees_with_the_weights_is_refused_before_building(folders, tmp_path, form, capsys):
    """A width that fits in memory but is not the weights': named from the headers, before the model is built."""
    folder = _altered(folders, form, tmp_path, width=64)
    assert main(_command("eval", folder, folders["text"])) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "tok_emb.weight' has shape (" in line and ", 32), the model" in line and ", 64);" in line, line


@pytest.mark.parametrize("form", ["gptforge", "hf"])
def test_unaltered_folders_still_load(folders, form, capsys):
    assert main(["generate", "--checkpoint", str(folders[form]), "--max-new-tokens", "3", "--device", "cpu",
                 "--temperature", "0"]) == 0
