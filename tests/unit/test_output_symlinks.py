"""Outputs never written through a symlink planted at the destination (issue 22, rows 4 and 5): `eval` on a
Hugging Face folder from elsewhere (FOLDER/eval.json -> victim) and `export-hf --force` into a folder holding
links (config.json, tokenizer.json, model.safetensors, ... -> victim): the link is replaced, the victim kept."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest

from gptforge.checkpoint import save_checkpoint
from gptforge.cli import main
from gptforge.data.tokenizer import train_bpe
from gptforge.fileio import write_file_atomic
from gptforge.model.gpt import GPTConfig, build_model
from gptforge.parallel.mesh import DistEnv

TEXT = "the quick brown fox jumps over the lazy dog. "
EXPORTED = ["model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "special_tokens_map.json"]
SECRET = b"the victim's own bytes\n"


def _checkpoint(root: Path) -> Path:
    tok = train_bpe([TEXT * 3] * 20, 280)
    cfg = GPTConfig(arch="llama", vocab_size=320, block_size=16, n_layer=2, n_head=2, n_kv_head=2, d_model=32,
                    d_ff=64)
    model = build_model(cfg, seed=0).eval()
    with tempfile.TemporaryDirectory() as d:
        tok.save(d)
        files = {f.name: f.read_bytes() for f in Path(d).iterdir()}
    files["model_config.json"] = json.dumps(cfg.to_dict())
    files["config.json"] = json.dumps({"model": {"preset": "test"}})
    return save_checkpoint(root / "run", 3, model, None, {"step": 3}, DistEnv(), files)


def _victim(root: Path, name: str) -> Path:
    v = root / "elsewhere" / name
    v.parent.mkdir(parents=True, exist_ok=True)
    v.write_bytes(SECRET)
    return v


def test_export_force_replaces_planted_links_and_keeps_their_targets(tmp_path):
    ck = _checkpoint(tmp_path)
    out = tmp_path / "hf"
    out.mkdir()
    victims = {}
    for name in EXPORTED:
        victims[name] = _victim(tmp_path, name)
        (out / name).symlink_to(victims[name])
    assert main(["export-hf", "--checkpoint", str(ck), "--out", str(out), "--force"]) == 0
    for name in EXPORTED:
        assert victims[name].read_bytes() == SECRET, name  # before the fix: overwritten through the link
        assert not (out / name).is_symlink() and (out / name).stat().st_size > 0, name
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]  # no temp files left behind


def test_eval_writes_nothing_into_the_folder_and_replaces_a_planted_link(tmp_path, monkeypatch, capsys):
    ck = _checkpoint(tmp_path)
    folder = tmp_path / "downloaded"
    assert main(["export-hf", "--checkpoint", str(ck), "--out", str(folder)]) == 0
    victim = _victim(tmp_path, "bashrc")
    (folder / "eval.json").symlink_to(victim)
    text = tmp_path / "text.txt"
    text.write_text(TEXT * 4)
    before = sorted(p.name for p in folder.iterdir())
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    # by default the results go to runs/eval/NAME.json here, never into the evaluated folder (issue 22, row 4)
    assert main(["eval", "--checkpoint", str(folder), "--text", str(text), "--device", "cpu"]) == 0
    assert "eval: results in runs/eval/downloaded.json" in capsys.readouterr().out
    assert sorted(p.name for p in folder.iterdir()) == before and (folder / "eval.json").is_symlink()
    res = json.loads((tmp_path / "runs" / "eval" / "downloaded.json").read_text())["results"][0]
    assert res["tokens"] > 0 and res["metrics"]["loss"]["value"] > 0
    # run from inside the folder, the default would land in it: refused, naming --out
    monkeypatch.chdir(folder)
    assert main(["eval", "--checkpoint", str(folder), "--text", str(text), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "into the evaluated folder" in err and "--out" in err and len(err.splitlines()) == 1, err
    # an --out that is a planted link: the link is replaced, its target never written
    assert main(["eval", "--checkpoint", str(folder), "--text", str(text), "--device", "cpu",
                 "--out", str(folder / "eval.json")]) == 0
    assert victim.read_bytes() == SECRET  # before the fix: the results were written into the victim
    assert not (folder / "eval.json").is_symlink()
    assert json.loads((folder / "eval.json").read_text())["results"][0] == res


def test_write_file_atomic_mode_and_failure_leaves_nothing(tmp_path):
    f = write_file_atomic(tmp_path / "a.json", "{}\n")
    assert f.read_text() == "{}\n" and f.stat().st_mode & 0o777 == 0o666 & ~_umask()
    (tmp_path / "d").mkdir()
    with pytest.raises(IsADirectoryError):
        write_file_atomic(tmp_path / "d", b"x")  # a folder at the name: refused, no temp file left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "d"]


def _umask() -> int:
    import os

    m = os.umask(0o022)
    os.umask(m)
    return m

