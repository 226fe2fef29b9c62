"""Loading a checkpoint never executes code (gptforge.checkpoint.safe_load), checkpoint configs and tokenizers are
checked, and a damaged checkpoint is named in one line.

Each crafted checkpoint is a copy of a real one with a hostile `.metadata` (or data file) whose payload
would create a marker file. A control test proves each payload is live: stock pickle / stock DCP loading
creates the marker. Then every route (generate, chat, export-hf, --init-from, resume) through the real CLI
must exit 2 with one line naming the checkpoint, and the marker must not exist."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_args

ROOT = Path(__file__).resolve().parents[2]
MARK = "PWNED"


def _s(x: str) -> bytes:
    b = x.encode()
    return pickle.SHORT_BINUNICODE + bytes([len(b)]) + b


def _glob(module: str, name: str) -> bytes:
    return _s(module) + _s(name) + pickle.STACK_GLOBAL


def dotted_system(marker: Path) -> bytes:
    """The payload: protocol 4 resolves `os.system` inside an allowed-looking module."""
    return (b"\x80\x04" + _glob("torch.distributed.checkpoint.filesystem", "os.system") + _s(f"touch {marker}")
            + pickle.TUPLE1 + pickle.REDUCE + pickle.STOP)


def builtins_eval(marker: Path) -> bytes:
    return (b"\x80\x04" + _glob("builtins", "eval") + _s(f"open({str(marker)!r}, 'w')") + pickle.TUPLE1
            + pickle.REDUCE + pickle.STOP)


def getattr_touch(marker: Path) -> bytes:
    """REDUCE chain: getattr(PosixPath(marker), 'touch')() using an allowed class."""
    path = _glob("pathlib", "PosixPath") + _s(str(marker)) + pickle.TUPLE1 + pickle.REDUCE
    bound = _glob("builtins", "getattr") + path + _s("touch") + pickle.TUPLE2 + pickle.REDUCE
    return b"\x80\x04" + bound + pickle.EMPTY_TUPLE + pickle.REDUCE + pickle.STOP


def dcp_loader(marker: Path, inner: Path) -> bytes:
    """A non-data callable of an allowed module: DCP's own loader, pointed at another folder whose
    .metadata it would unpickle with plain pickle (os.system there, no dotted name needed)."""
    inner.mkdir(parents=True, exist_ok=True)
    (inner / ".metadata").write_bytes(b"\x80\x04" + _glob("os", "system") + _s(f"touch {marker}") + pickle.TUPLE1
                                      + pickle.REDUCE + pickle.STOP)
    reader = _glob("torch.distributed.checkpoint.filesystem", "FileSystemReader") + _s(str(inner)) + \
        pickle.TUPLE1 + pickle.REDUCE
    args = pickle.EMPTY_DICT + reader + pickle.NONE + pickle.BININT1 + b"\x00" + pickle.NEWTRUE
    return (b"\x80\x04" + _glob("torch.distributed.checkpoint.state_dict_loader", "_load_state_dict") + pickle.MARK
            + args + pickle.TUPLE + pickle.REDUCE + pickle.STOP)


class _Evil:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def bytes_route(ckpt: Path, marker: Path) -> None:
    """Only allowed classes in .metadata, but the token embedding declared as pickled bytes, pointing at a
    torch.save'd payload appended to the data file: stock DCP torch.load(weights_only=False)s it."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    md = pickle.loads((ckpt / ".metadata").read_bytes())
    buf = io.BytesIO()
    torch.save(_Evil(marker), buf)
    data = ckpt / "__0_0.distcp"
    offset = data.stat().st_size
    with open(data, "ab") as f:
        f.write(buf.getvalue())
    fqn = "model.tok_emb.weight"
    md.state_dict_metadata[fqn] = BytesStorageMetadata()
    md.storage_data = {k: v for k, v in md.storage_data.items() if k.fqn != fqn}
    md.storage_data[MetadataIndex(fqn)] = _StorageInfo("__0_0.distcp", offset, len(buf.getvalue()))
    (ckpt / ".metadata").write_bytes(pickle.dumps(md, protocol=4))


PAYLOADS = {"dotted_os_system": dotted_system, "builtins_eval": builtins_eval, "getattr_reduce": getattr_touch}


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, char_data) -> Path:
    """A tiny run with a checkpoint at step 2 (model and optimizer state)."""
    from gptforge.cli import main

    out = tmp_path_factory.mktemp("sec_base")
    assert main(["pretrain", *tiny_args(out, char_data, "--train.max_steps=2")]) == 0
    return out


def _ckpt(run: Path) -> Path:
    return run / "checkpoints" / "step_0000002"


def craft(base_run: Path, where: Path, kind: str) -> tuple[Path, Path]:
    """(checkpoint dir, marker path) of a crafted copy of the base checkpoint."""
    ck = where / "evil"
    shutil.copytree(_ckpt(base_run), ck)
    marker = where / MARK
    if kind == "bytes_route":
        bytes_route(ck, marker)
    elif kind == "dcp_loader":
        (ck / ".metadata").write_bytes(dcp_loader(marker, where / "inner"))
    else:
        (ck / ".metadata").write_bytes(PAYLOADS[kind](marker))
    return ck, marker


KINDS = [*PAYLOADS, "dcp_loader", "bytes_route"]


def gptforge(*args: str, cwd: Path, stdin: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "gptforge", *args], cwd=cwd, env=env, input=stdin,
                          capture_output=True, text=True, timeout=180)


def assert_refused(r: subprocess.CompletedProcess, ck: Path, marker: Path, word: str = "refused") -> str:
    err = r.stderr.strip()
    assert r.returncode == 2, f"exit {r.returncode}\n{r.stdout[-2000:]}\n{err[-3000:]}"
    assert len(err.splitlines()) == 1, err  # one line, no traceback
    assert f"checkpoint '{ck}" in err and word in err, err
    assert "Traceback" not in r.stdout + r.stderr
    assert not marker.exists(), "the payload ran"
    return err


@pytest.mark.parametrize("kind", KINDS)
def test_payload_is_live_with_stock_loading(base_run, tmp_path, kind):
    """Control: the crafted checkpoint does run its payload under plain pickle / stock DCP loading, so the
    refusals below are what stops it."""
    ck, marker = craft(base_run, tmp_path, kind)
    if kind == "bytes_route":
        code = ("import torch.distributed.checkpoint as d, torch, sys; from gptforge.checkpoint import load_model;"
                "from gptforge.checkpoint import model_config; from gptforge.model.gpt import build_model;"
                "from torch.distributed.checkpoint.state_dict import get_model_state_dict as g;"
                "m=build_model(model_config(__import__('pathlib').Path(sys.argv[1])),'cpu');"
                "d.load({'model': g(m)}, checkpoint_id=sys.argv[1], no_dist=True)")
    else:
        code = "import pickle, sys, torch; pickle.load(open(sys.argv[1] + '/.metadata', 'rb'))"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    subprocess.run([sys.executable, "-c", code, str(ck)], cwd=tmp_path, env=env, capture_output=True, timeout=120)
    assert marker.exists(), f"{kind}: the payload did not run under stock loading (the test would prove nothing)"


@pytest.mark.parametrize("kind", KINDS)
def test_generate_refuses_crafted_checkpoint(base_run, tmp_path, kind):
    ck, marker = craft(base_run, tmp_path, kind)
    r = gptforge("generate", "--checkpoint", str(ck), "--prompt", "hi", "--max-new-tokens", "3", cwd=tmp_path)
    err = assert_refused(r, ck, marker)
    assert "bytes" in err if kind == "bytes_route" else ".metadata asks for" in err


@pytest.mark.parametrize("kind", KINDS)
def test_resume_refuses_crafted_checkpoint(base_run, tmp_path, char_data, kind):
    ck, marker = craft(base_run, tmp_path, kind)
    out = tmp_path / "run"
    r = gptforge("pretrain", *tiny_args(out, char_data, "--train.max_steps=4", f"--train.resume={ck}"),
                 cwd=tmp_path)
    assert_refused(r, ck, marker)
    assert not (out / "checkpoints").exists()  # nothing trained or saved from it


@pytest.mark.parametrize("route", ["chat", "export-hf", "init-from"])
def test_other_routes_refuse_crafted_checkpoint(base_run, tmp_path, char_data, route):
    ck, marker = craft(base_run, tmp_path, "dotted_os_system")
    if route == "chat":
        r = gptforge("chat", "--checkpoint", str(ck), "--allow-base", cwd=tmp_path, stdin="hello\n")
    elif route == "export-hf":
        r = gptforge("export-hf", "--checkpoint", str(ck), "--out", str(tmp_path / "hf"), cwd=tmp_path)
    else:
        r = gptforge("pretrain", *tiny_args(tmp_path / "run", char_data, "--train.max_steps=2"),
                     f"--init-from={ck}", cwd=tmp_path)
    assert_refused(r, ck, marker)


def test_allow_list_is_exactly_what_real_checkpoints_hold(base_run):
    """Every global in a real checkpoint's .metadata is allowed, and the list holds nothing else but the
    classes the other formats (FSDP/DTensor, TP, replicas, full) add: see gptforge.checkpoint.safe_load."""
    from gptforge.checkpoint.safe_load import ALLOWED, SafeUnpickler

    seen = set()

    class Recorder(pickle.Unpickler):
        def find_class(self, module, name):
            seen.add((module, name))
            return super().find_class(module, name)

    raw = (_ckpt(base_run) / ".metadata").read_bytes()
    Recorder(io.BytesIO(raw)).load()
    dtypes = {(m, n) for m, n in seen if m == "torch" and isinstance(getattr(torch, n), torch.dtype)}
    assert seen - dtypes == set(ALLOWED), (seen - dtypes) ^ set(ALLOWED)
    assert SafeUnpickler(io.BytesIO(raw)).load().state_dict_metadata.keys() == \
        pickle.loads(raw).state_dict_metadata.keys()


def test_normal_checkpoint_loads_identically(base_run):
    """The safe reader gives the same weights (logits) and optimizer param_groups as stock DCP."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from gptforge.checkpoint import load_checkpoint, load_model, model_config
    from gptforge.model.gpt import build_model
    from gptforge.parallel.mesh import DistEnv
    from gptforge.train.optim import build_optimizer

    ck = _ckpt(base_run)
    safe = load_model(ck).eval()
    stock = build_model(model_config(ck), "cpu").eval()
    state = {"model": get_model_state_dict(stock)}
    dcp.load(state, checkpoint_id=str(ck), no_dist=True)
    stock.load_state_dict(state["model"])
    x = torch.randint(0, safe.cfg.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.equal(safe(x)[0], stock(x)[0])
    # resume path: optimizer param_groups are the only bytes items; read as plain values
    from gptforge.config.schema import Config

    model = build_model(model_config(ck), "cpu")
    tcfg = Config().train
    tcfg.optimizer = json.loads((ck / "config.json").read_text())["train"]["optimizer"]  # the run's own
    opt = build_optimizer(model, tcfg, torch.device("cpu"))
    for g in opt.param_groups:
        g["lr"] = -1.0
    load_checkpoint(ck, model, opt, DistEnv())
    assert all(g["lr"] > 0 for g in opt.param_groups)


@pytest.mark.parametrize("key,value", [("n_layer", -1), ("n_layer", 0), ("d_ff", 0), ("n_head", "x"),
                                       ("block_size", 2.5), ("dropout", 2), ("d_model", None)])
def test_invalid_model_config_json_is_one_line(base_run, tmp_path, key, value):
    ck = tmp_path / "ck"
    shutil.copytree(_ckpt(base_run), ck)
    cfg = json.loads((ck / "model_config.json").read_text())
    cfg[key] = value
    (ck / "model_config.json").write_text(json.dumps(cfg))
    r = gptforge("generate", "--checkpoint", str(ck), "--prompt", "hi", "--max-new-tokens", "3", cwd=tmp_path)
    err = r.stderr.strip()
    assert r.returncode == 2 and len(err.splitlines()) == 1, err
    assert "model_config.json" in err and f"model.{key}" in err and str(ck) in err, err


def test_cli_model_config_ranges_are_checked(tmp_path, char_data):
    r = gptforge("pretrain", *tiny_args(tmp_path / "run", char_data, "--train.max_steps=2"), "--model.n_layer=0",
                 cwd=tmp_path)
    err = r.stderr.strip()
    assert r.returncode == 2 and "model.n_layer" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_resume_with_another_tokenizer_of_the_same_size_stops(base_run, tmp_path, char_data, shakespeare_small):
    """A char tokenizer of the same text with 'z' spelt 'é': the same size, another mapping."""
    from gptforge.data.prepare import prepare

    text = tmp_path / "other.txt"
    original = shakespeare_small.read_text(encoding="utf-8")
    assert "é" not in original and "z" in original
    text.write_text(original.replace("z", "é"), encoding="utf-8")
    other = tmp_path / "other_data"
    prepare([str(text)], other, "char", val_fraction=0.05, progress=False)
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    r = gptforge("pretrain", *tiny_args(run, other, "--train.max_steps=4", "--train.resume=auto"), cwd=tmp_path)
    err = r.stderr.strip()
    assert r.returncode == 2 and len(err.splitlines()) == 1, err
    assert "another tokenizer" in err and "data.tokenizer" in err and "step_0000002" in err, err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before  # nothing lost or added
    # the same tokenizer resumes (the id is stable across save -> load -> save)
    r = gptforge("pretrain", *tiny_args(run, char_data, "--train.max_steps=3", "--train.resume=auto"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from" in r.stdout


@pytest.mark.parametrize("damage,expect", [
    ("truncate_data", "__0_0.distcp is truncated"), ("delete_data", "__0_0.distcp is missing"),
    ("truncate_metadata", ".metadata is unreadable"), ("garbage_data", "corrupt or truncated")])
def test_damaged_checkpoint_is_one_clean_line(base_run, tmp_path, damage, expect):
    ck = tmp_path / "ck"
    shutil.copytree(_ckpt(base_run), ck)
    data, meta = ck / "__0_0.distcp", ck / ".metadata"
    if damage == "truncate_data":
        data.write_bytes(data.read_bytes()[:1000])
    elif damage == "delete_data":
        data.unlink()
    elif damage == "truncate_metadata":
        meta.write_bytes(meta.read_bytes()[:300])
    else:
        raw = bytearray(data.read_bytes())
        raw[: len(raw) // 2] = bytes(len(raw) // 2)  # zeroed: the size is right, the content is not
        data.write_bytes(bytes(raw))
    r = gptforge("generate", "--checkpoint", str(ck), "--prompt", "hi", "--max-new-tokens", "3", cwd=tmp_path)
    err = r.stderr.strip()
    assert r.returncode == 2 and len(err.splitlines()) == 1, err
    assert expect in err and str(ck) in err and "Traceback" not in err and 'File "' not in err, err

