"""The fault table: every bad input a user can give (config values, flags of every command,
bad files) ends with exit code 2, exactly one line on stderr (no traceback) that names the config key,
flag or file to fix, and no file lost: an existing run folder (a real trained checkpoint, used as
train.out_dir and --checkpoint) and the input files keep their file listing and bytes.

Most cases run in-process through the CLI entry (gptforge.cli.main, stderr captured); the ones marked
`sub` run as real `python -m gptforge` processes. With GPTFORGE_FAULT_TABLE=PATH the table (case, exit
code, message) is written there as markdown.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from gptforge import cli
from gptforge.checkpoint import list_checkpoints


@dataclass
class Case:
    id: str
    argv: list[str]  # {run}: a trained run folder, {tmp}: a folder of bad input files, {data}: prepared data,
    # {absurd}: hostile copies of the run's checkpoint and export (fixture absurd_folders)
    names: list[str]  # what the one line must name (all of them): the config key / flag / file
    env: dict = field(default_factory=dict)
    sub: bool = False  # a real `python -m gptforge` process instead of cli.main in-process
    absent: list[str] = field(default_factory=list)  # paths that must not exist afterwards (nothing written)


RUN = ["--train.out_dir={run}", "--train.max_steps=2", "--train.progress=false"]


def pretrain(*a: str) -> list[str]:
    return ["pretrain", *RUN, "--data.path={data}", *a]


CASES: list[Case] = [
    # ---- training config values (silent wrong results, tracebacks) -------------------------------------------
    Case("lr=-1", pretrain("--train.lr=-1"), ["train.lr"], sub=True),
    Case("lr=0", pretrain("--train.lr=0"), ["train.lr"]),
    Case("lr=nan", pretrain("--train.lr=nan"), ["train.lr"]),
    Case("lr=abc", pretrain("--train.lr=abc"), ["train.lr"]),
    Case("beta1=1.5", pretrain("--train.beta1=1.5"), ["train.beta1"]),
    Case("beta2=-0.1", pretrain("--train.beta2=-0.1"), ["train.beta2"]),
    Case("dropout=2", pretrain("--model.dropout=2"), ["model.dropout"]),
    Case("log_every=0", pretrain("--train.log_every=0"), ["train.log_every"]),
    Case("eval_every=-1", pretrain("--train.eval_every=-1"), ["train.eval_every"]),
    Case("save_every=-5", pretrain("--train.save_every=-5"), ["train.save_every"]),
    Case("micro_batch=0", pretrain("--train.micro_batch=0"), ["train.micro_batch"]),
    Case("grad_accum=0", pretrain("--train.grad_accum=0"), ["train.grad_accum"]),
    Case("max_steps=0", pretrain("--train.max_steps=0"), ["train.max_steps"]),
    Case("n_layer=0", pretrain("--model.n_layer=0"), ["model.n_layer"]),
    Case("n_layer=-1", pretrain("--model.n_layer=-1"), ["model.n_layer"]),
    Case("d_ff=0", pretrain("--model.d_ff=0"), ["model.d_ff"]),
    Case("n_head=5 (d_model 256)", pretrain("--model.n_head=5"), ["model.n_head", "model.d_model"]),
    Case("n_kv_head=3", pretrain("--model.n_kv_head=3"), ["model.n_kv_head"]),
    Case("device=banana", pretrain("--train.device=banana"), ["train.device", "cuda:N"], sub=True),
    Case("schedule=banana", pretrain("--train.schedule=banana"), ["train.schedule"]),
    Case("precision=fp8", pretrain("--train.precision=fp8"), ["train.precision"]),
    Case("preset=huge", pretrain("--model.preset=huge"), ["model.preset"]),
    Case("val_fraction=0.9", pretrain("--data.val_fraction=0.9"), ["data.val_fraction"]),
    Case("parallel.tp=0", pretrain("--parallel.tp=0"), ["parallel.tp"]),
    Case("dpo.beta=0", ["dpo", *RUN, "--init-from={run}", "--data.path={tmp}/pairs_same.jsonl", "--dpo.beta=0"],
         ["dpo.beta"]),
    # the whole hint: 'train.lr' alone is a substring of 'train.lrr', so it would pass without one
    Case("unknown key", pretrain("--train.lrr=1"),
         ["unknown config key 'train.lrr' on the command line; did you mean 'train.lr'?"]),
    Case("out_dir unwritable", ["pretrain", "--train.out_dir=/proc/gptforge-no/run", "--data.path={data}"],
         ["train.out_dir", "/proc/gptforge-no/run"]),
    Case("out_dir under a file", ["pretrain", "--train.out_dir={run}/config.json/run", "--data.path={data}"],
         ["train.out_dir", "config.json"]),
    Case("GPTFORGE_CACHE unwritable", ["pretrain", *RUN], ["cache", "{run}/config.json/cache", "GPTFORGE_CACHE"],
         env={"GPTFORGE_CACHE": "{run}/config.json/cache"}),
    # ---- config files ----------------------------------------------------------------------------------------
    Case("YAML list config", pretrain("--config={tmp}/list.yaml"), ["{tmp}/list.yaml", "table of sections"],
         sub=True),
    Case("binary config", pretrain("--config={tmp}/binary.toml"), ["{tmp}/binary.toml", "not a text file"]),
    Case("missing config", pretrain("--config={tmp}/nope.toml"), ["{tmp}/nope.toml"]),
    Case("invalid TOML", pretrain("--config={tmp}/broken.toml"), ["{tmp}/broken.toml", "TOML"]),
    Case("config value out of range", pretrain("--config={tmp}/bad_lr.toml"), ["train.lr"]),
    Case("config nested table", pretrain("--config={tmp}/nested.yaml"), ["train.lr", "{tmp}/nested.yaml"]),
    # ---- generate / chat flags -----------------------------------------------------------------------------
    Case("generate --max-new-tokens -5", ["generate", "--checkpoint", "{run}", "--max-new-tokens", "-5"],
         ["--max-new-tokens"], sub=True),
    Case("generate --temperature -1", ["generate", "--checkpoint", "{run}", "--temperature", "-1"],
         ["--temperature"]),
    Case("generate --num-samples 0", ["generate", "--checkpoint", "{run}", "--num-samples", "0"],
         ["--num-samples"]),
    Case("generate --top-k -1", ["generate", "--checkpoint", "{run}", "--top-k", "-1"], ["--top-k"]),
    Case("generate --top-p 1.5", ["generate", "--checkpoint", "{run}", "--top-p", "1.5"], ["--top-p"]),
    Case("generate --top-p 0", ["generate", "--checkpoint", "{run}", "--top-p", "0"], ["--top-p"]),
    Case("generate --device banana", ["generate", "--checkpoint", "{run}", "--device", "banana"], ["--device"]),
    Case("generate missing checkpoint", ["generate", "--checkpoint", "{tmp}/no_such_run"], ["{tmp}/no_such_run"]),
    Case("chat on a pretrain-only checkpoint", ["chat", "--checkpoint", "{run}", "--message", "hi"],
         ["{run}", "chat_template.jinja", "--allow-base"]),
    Case("chat --max-new-tokens 0", ["chat", "--checkpoint", "{run}", "--max-new-tokens", "0"],
         ["--max-new-tokens"]),
    Case("chat --temperature -2", ["chat", "--checkpoint", "{run}", "--temperature", "-2"], ["--temperature"]),
    # ---- data commands and data files ------------------------------------------------------------------------
    Case("train-tokenizer on empty input", ["train-tokenizer", "--input", "{tmp}/empty.txt", "--vocab-size", "300",
                                            "--out", "{tmp}/tok_out"], ["--input", "{tmp}/empty.txt"],
         absent=["{tmp}/tok_out"]),
    Case("train-tokenizer --vocab-size 10", ["train-tokenizer", "--input", "{tmp}/empty.txt", "--vocab-size", "10",
                                             "--out", "{tmp}/tok_out"], ["--vocab-size"], absent=["{tmp}/tok_out"]),
    Case("prepare --val-fraction 0.9", ["prepare", "--input", "{tmp}/empty.txt", "--out", "{tmp}/prep_out",
                                        "--val-fraction", "0.9"], ["--val-fraction"], absent=["{tmp}/prep_out"]),
    Case("sft non-UTF-8 JSONL", ["sft", *RUN, "--data.path={tmp}/latin1.jsonl"], ["{tmp}/latin1.jsonl:2",
                                                                                  "--data.skip_bad_lines"]),
    Case("sft non-UTF-8 JSON array", ["sft", *RUN, "--data.path={tmp}/latin1.json"], ["{tmp}/latin1.json:3"]),
    Case("sft missing data", ["sft", *RUN, "--data.path={tmp}/nothing.jsonl"], ["{tmp}/nothing.jsonl"]),
    Case("dpo all pairs identical", ["dpo", *RUN, "--init-from={run}", "--data.path={tmp}/pairs_same.jsonl"],
         ["{tmp}/pairs_same.jsonl", "identical"]),
    # ---- launch / doctor -------------------------------------------------------------------------------------
    Case("doctor --master-port 70000", ["doctor", "--master-port", "70000"], ["--master-port"], sub=True),
    Case("launch unresolvable master", ["launch", "--nnodes", "2", "--master-addr", "no-such-host.invalid",
                                        "--rdzv-timeout", "10", "--", "pretrain"], ["--master-addr"], sub=True),
    Case("launch --nnodes 0", ["launch", "--nnodes", "0", "--", "pretrain"], ["--nnodes"]),
    Case("launch --rdzv-timeout 0", ["launch", "--rdzv-timeout", "0", "--", "pretrain"], ["--rdzv-timeout"]),
    # ---- files and clients from elsewhere (issue 22; docs/security.md) ---------------------------------------------
    Case("config YAML billion laughs", pretrain("--config={tmp}/laughs.yaml"), ["{tmp}/laughs.yaml", "section 'model'"],
         sub=True),
    Case("eval: model_config.json n_layer=10**6", ["eval", "--checkpoint", "{absurd}/gptforge", "--text",
                                                   "{tmp}/text.txt", "--device", "cpu"],
         ["{absurd}/gptforge", "1,000,000 layers", "weights hold 2"], sub=True),
    Case("generate: model_config.json n_layer=10**6", ["generate", "--checkpoint", "{absurd}/gptforge",
                                                       "--max-new-tokens", "3", "--device", "cpu"],
         ["{absurd}/gptforge", "1,000,000 layers", "weights hold 2"], sub=True),
    Case("eval: HF config.json n_layer=10**6", ["eval", "--checkpoint", "{absurd}/hf", "--text", "{tmp}/text.txt",
                                                "--device", "cpu"], ["{absurd}/hf", "1,000,000 layers"], sub=True),
    Case("generate: HF config.json n_layer=10**6", ["generate", "--checkpoint", "{absurd}/hf", "--max-new-tokens",
                                                    "3", "--device", "cpu"], ["{absurd}/hf", "1,000,000 layers"],
         sub=True),
    Case("HF folder: safetensors header of 2**62 bytes", ["generate", "--checkpoint", "{absurd}/header_bomb",
                                                          "--device", "cpu"],
         ["{absurd}/header_bomb/model.safetensors", "header too large"]),
    # transformers' AutoConfig.from_pretrained(folder, trust_remote_code=True) runs these files and leaves the marker
    Case("HF folder: auto_map to remote code", ["generate", "--checkpoint", "{absurd}/remote_code", "--device", "cpu"],
         ["model_type 'evil_gpt'"], absent=["{absurd}/pwned"]),
    Case("serve --host 0.0.0.0 without a key", ["serve", "--checkpoint", "{run}", "--host", "0.0.0.0", "--port", "0"],
         ["--host 0.0.0.0", "GPTFORGE_API_KEY", "--api-key-file", "--allow-no-key"], env={"GPTFORGE_API_KEY": ""},
         sub=True),
    Case("serve --api-key-file missing", ["serve", "--checkpoint", "{run}", "--api-key-file", "{tmp}/no_key"],
         ["--api-key-file '{tmp}/no_key'"]),
    Case("serve --api-key-file empty", ["serve", "--checkpoint", "{run}", "--api-key-file", "{tmp}/empty.txt"],
         ["--api-key-file '{tmp}/empty.txt'", "empty"], sub=True),
    Case("launch --hostfile, env name with $(...)", ["launch", "--hostfile", "{tmp}/hosts", "--dry-run", "--",
                                                     "pretrain"],
         ["environment variable name 'NCCL_$(touch pwned)'"], env={"NCCL_$(touch pwned)": "1"}),
    # ---- rows of other commands go here --------------------------------------------------------------------------
    # checkpoint security (crafted .metadata, bytes entries), checkpoint configs on load (n_layer=-1), tokenizer
    # identity on resume, preemption, disk full, export-hf --out FILE / --force, finished-run resume, out_dir
    # conflicts: add Case(...) rows with the same three promises (exit 2, one line naming it, nothing lost).
]

RESULTS: list[tuple[str, int, str, float]] = []


# ---- the inputs ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("bad_inputs")
    (d / "list.yaml").write_text("- train\n- model\n")
    (d / "binary.toml").write_bytes(bytes(range(256)) * 4)
    (d / "broken.toml").write_text("[train\nlr = 1\n")
    (d / "bad_lr.toml").write_text("[train]\nlr = -0.5\n")
    (d / "nested.yaml").write_text("train:\n  lr:\n    value: 1\n")
    (d / "empty.txt").write_text("")
    ok = '{"messages": [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "ba"}]}'
    bad = '{"messages": [{"role": "user", "content": "caf\xe9"}, {"role": "assistant", "content": "x"}]}'
    (d / "latin1.jsonl").write_bytes((ok + "\n" + bad + "\n" + ok + "\n").encode("latin-1"))
    (d / "latin1.json").write_bytes(("[\n" + ok + ",\n" + bad + "\n]\n").encode("latin-1"))
    same = '{"prompt": "p%d", "chosen": "same", "rejected": "same"}\n'
    (d / "pairs_same.jsonl").write_text("".join(same % i for i in range(8)))
    (d / "text.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 4)
    (d / "hosts").write_text("node1\n")
    # 9 levels of 9 aliases: ~400 bytes, 387M leaves once walked (issue 22 row 7)
    (d / "laughs.yaml").write_text("model:" + "".join(
        f"\n- &l{i} [{','.join(['lol' if i == 0 else f'*l{i - 1}'] * 9)}]" for i in range(9)) + "\n")
    return d


@pytest.fixture(scope="module")
def absurd_folders(trained_run, tmp_path_factory) -> Path:
    """Model folders from elsewhere: a copy of the trained run's checkpoint (gptforge/) and of its Hugging Face export
    (hf/), each config asking for 10**6 layers (issue 22 row 3); the export with a safetensors header bomb
    (header_bomb/), and with an auto_map to Python files (remote_code/)."""
    d = tmp_path_factory.mktemp("absurd")
    shutil.copytree(list_checkpoints(trained_run)[-1], d / "gptforge")
    assert cli.main(["export-hf", "--checkpoint", str(trained_run), "--out", str(d / "hf")]) == 0
    shutil.copytree(d / "hf", d / "header_bomb")  # a safetensors header that says it is 2**62 bytes long
    (d / "header_bomb/model.safetensors").write_bytes(struct.pack("<Q", 2**62) + b"{" + b" " * 100)
    shutil.copytree(d / "hf", d / "remote_code")  # auto_map to Python files that would leave d/pwned on import
    conf = json.loads((d / "remote_code/config.json").read_text())
    conf |= {"model_type": "evil_gpt", "auto_map": {"AutoConfig": "configuration_evil.EvilConfig",
                                                    "AutoModelForCausalLM": "modeling_evil.EvilModel"}}
    (d / "remote_code/config.json").write_text(json.dumps(conf))
    for module in ("configuration_evil", "modeling_evil"):
        (d / "remote_code" / f"{module}.py").write_text(f"import pathlib\npathlib.Path({str(d / 'pwned')!r}).touch()\n")
    for name in ("gptforge/model_config.json", "hf/config.json"):
        (d / name).write_text(json.dumps(json.loads((d / name).read_text()) | {"n_layer": 10**6}))
    return d


def _snapshot(*folders: Path) -> dict[str, str]:
    out = {}
    for folder in folders:
        for p in sorted(folder.rglob("*")):
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def _fill(s: str, paths: dict[str, Path]) -> str:
    for k, v in paths.items():
        s = s.replace("{" + k + "}", str(v))
    return s


def _in_process(argv: list[str]) -> tuple[int, str]:
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            rc = cli.main(argv)
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 1
        except BaseException:  # a traceback: the case fails, showing it
            err.write(traceback.format_exc())
            rc = 1
    return rc, err.getvalue()


def _subprocess(argv: list[str], env: dict, cwd: Path) -> tuple[int, str]:
    r = subprocess.run([sys.executable, "-m", "gptforge", *argv], capture_output=True, text=True, timeout=120,
                       env={**os.environ, **env}, cwd=cwd, stdin=subprocess.DEVNULL)
    return r.returncode, r.stderr


@pytest.fixture(scope="module", autouse=True)
def _write_table():
    yield
    path = os.environ.get("GPTFORGE_FAULT_TABLE")
    if path and RESULTS:
        rows = ["| case | exit | seconds | message |", "|---|---|---|---|"]
        for case, rc, msg, secs in RESULTS:
            rows.append(f"| {case} | {rc} | {secs:.1f} | {msg.strip().replace('|', '/')} |")
        Path(path).write_text("\n".join(rows) + "\n")


def test_the_table_has_at_least_40_cases():
    assert len(CASES) >= 40
    assert len({c.id for c in CASES}) == len(CASES)
    assert sum(c.sub for c in CASES) >= 5


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_fault(case: Case, trained_run, char_data, bad_files, absurd_folders, tmp_path, monkeypatch):
    paths = {"run": trained_run, "tmp": bad_files, "data": char_data, "absurd": absurd_folders}
    argv = [_fill(a, paths) for a in case.argv]
    env = {k: _fill(v, paths) for k, v in case.env.items()}
    before = _snapshot(trained_run, bad_files, absurd_folders)
    monkeypatch.chdir(tmp_path)  # nothing may be written to the working folder either
    t0 = time.perf_counter()
    if case.sub:
        rc, stderr = _subprocess(argv, env, tmp_path)
    else:
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        rc, stderr = _in_process(argv)
    secs = time.perf_counter() - t0
    RESULTS.append((case.id + (" (process)" if case.sub else ""), rc, stderr, secs))
    lines = stderr.strip().splitlines()
    assert rc == 2, stderr
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr and lines[0].startswith("gptforge: error: "), stderr
    for name in case.names:
        assert _fill(name, paths) in lines[0], f"{name!r} not named in: {lines[0]}"
    assert _snapshot(trained_run, bad_files, absurd_folders) == before, "a file was changed, added or lost"
    assert not list(tmp_path.iterdir()), f"files written to the working folder: {list(tmp_path.iterdir())}"
    for p in case.absent:
        assert not Path(_fill(p, paths)).exists(), f"{p} was written"
