"""One set of source rules for prepare, SFT and DPO: ~ expanded, hidden names skipped in folder walks,
comma lists, JSON array vs JSONL by the first character, records named file:line / file[i], datasets."""

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from support.checks import run_gptforge

from gptforge.data.preference import read_pairs
from gptforge.data.records import DataStats, iter_records
from gptforge.data.sft import read_conversations
from gptforge.data.sources import iter_texts, resolve_inputs
from gptforge.data.tokenizer import char_tokenizer
from gptforge.errors import UserError

CONV = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
PAIR = {"prompt": "q", "chosen": "a", "rejected": "b"}


def texts(inputs):
    """The documents prepare would tokenize."""
    docs, cur = [], ""
    for piece, end in iter_texts(resolve_inputs(inputs)):
        cur += piece
        if end:
            docs, cur = docs + [cur], ""
    return docs


def where(spec, skip_bad=False, stats=None):
    return [w for w, _ in iter_records(spec, skip_bad, stats or DataStats())]


def test_tilde_is_expanded_for_every_reader(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "t.txt").write_text("hi\n")
    (tmp_path / "c.jsonl").write_text(json.dumps(CONV) + "\n")
    (tmp_path / "p.jsonl").write_text(json.dumps(PAIR) + "\n")
    assert texts("~/t.txt") == ["hi\n"] and texts(["~/*.txt"]) == ["hi\n"]
    assert len(read_conversations("~/c.jsonl")[0]) == 1
    assert len(read_pairs("~/p.jsonl", char_tokenizer(["qab"]), 32)[0]) == 1


def test_hidden_files_and_folders_are_skipped_in_folder_walks(tmp_path):
    d = tmp_path / "d"
    for rel in ("a.jsonl", ".hidden.jsonl", ".git/x.jsonl", "sub/b.jsonl", "sub/.c.jsonl"):
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_text(json.dumps({"text": rel, **CONV}) + "\n")
    assert texts(str(d)) == ["a.jsonl", "sub/b.jsonl"]
    assert where(str(d)) == [f"{d}/a.jsonl:1", f"{d}/sub/b.jsonl:1"]
    assert texts(str(d / ".hidden.jsonl")) == [".hidden.jsonl"]  # named explicitly: read


def test_json_array_or_jsonl_by_first_character_whatever_the_suffix(tmp_path):
    (tmp_path / "arr.jsonl").write_text("\n  [" + json.dumps({"text": "x", **CONV}) + ",\n" + json.dumps({"text": "y"}) + "]")
    (tmp_path / "lines.json").write_text(json.dumps({"text": "z", **CONV}) + "\n\n" + json.dumps({"text": "w", **CONV}))
    assert texts(str(tmp_path / "arr.jsonl")) == ["x", "y"] and texts(str(tmp_path / "lines.json")) == ["z", "w"]
    assert where(str(tmp_path / "arr.jsonl")) == [f"{tmp_path}/arr.jsonl[0]", f"{tmp_path}/arr.jsonl[1]"]
    assert where(str(tmp_path / "lines.json")) == [f"{tmp_path}/lines.json:1", f"{tmp_path}/lines.json:3"]


def test_comma_lists_for_every_reader(tmp_path):
    for name in ("a", "b", "c,d"):
        (tmp_path / f"{name}.jsonl").write_text(json.dumps({"text": name, **CONV}) + "\n")
    spec = f"{tmp_path}/a.jsonl,{tmp_path}/b.jsonl"
    assert texts(spec) == ["a", "b"] and texts([spec, str(tmp_path / "c,d.jsonl")]) == ["a", "b", "c,d"]
    assert len(read_conversations(spec)[0]) == 2
    with pytest.raises(UserError, match="input '.*nope.jsonl' not found"):
        read_conversations(f"{tmp_path}/a.jsonl,{tmp_path}/nope.jsonl")
    with pytest.raises(UserError, match="no input given; pass --data.path"):
        read_conversations("")


def test_a_comma_list_expands_each_glob(tmp_path):
    """"a.txt,dir/*.txt": a file and a glob, each read by the rules (not one glob of the whole); a glob holding a
    comma that matches as a whole stays one glob; a part that matches nothing is named."""
    (tmp_path / "d").mkdir()
    for rel, text in (("a.txt", "A\n"), ("d/x.txt", "X\n"), ("d/y.txt", "Y\n"), ("k,1.txt", "K\n")):
        (tmp_path / rel).write_text(text)
    assert texts(f"{tmp_path}/a.txt,{tmp_path}/d/*.txt") == ["A\n", "X\n", "Y\n"]
    assert texts(f"{tmp_path}/d/*.txt,{tmp_path}/a.txt") == ["X\n", "Y\n", "A\n"]
    assert texts(f"{tmp_path}/k,*.txt") == ["K\n"]
    with pytest.raises(UserError, match=r"input glob '.*/e/\*.txt' matches no files"):
        texts(f"{tmp_path}/a.txt,{tmp_path}/e/*.txt")


def test_bad_lines_are_named_or_skipped_and_counted(tmp_path):
    f = tmp_path / "mixed.jsonl"
    good = json.dumps({"text": "t", **CONV}).encode()
    f.write_bytes(good + b"\n\xff\xfe\n{oops\n" + good + b"\n")
    with pytest.raises(UserError, match=rf"{f}:2: not valid UTF-8; fix the line or pass --data.skip_bad_lines"):
        read_conversations(str(f))
    convs, stats = read_conversations(str(f), skip_bad=True)
    assert len(convs) == 2 and stats.bad_lines == 2 and stats.first_bad == f"{f}:2: not valid UTF-8"
    broken = tmp_path / "broken.json"
    broken.write_text("[\n" + json.dumps(CONV) + ",\n{oops]")
    with pytest.raises(UserError, match=rf"{broken}:3: invalid JSON"):
        read_conversations(str(broken))
    stats = DataStats()
    assert where(f"{broken},{f}", skip_bad=True, stats=stats) == [f"{f}:1", f"{f}:4"]
    assert stats.bad_lines == 3 and "the whole file is skipped" in stats.first_bad
    with pytest.raises(UserError, match=rf"{f}:2: not valid UTF-8; fix or remove that line"):
        texts(str(f))  # prepare: no skipping


def test_datasets_feed_sft_and_prepare_alike(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = {"messages": [CONV["messages"]] * 3, "text": ["t0", "t1", "t2"]}
    ds = datasets.Dataset.from_dict(rows)
    ds.to_parquet(str(tmp_path / "chats.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    for spec in (str(tmp_path / "chats.parquet"), str(tmp_path / "saved")):
        convs, stats = read_conversations(spec)
        assert convs == [CONV["messages"]] * 3 and stats.records == 3
        assert texts(spec) == ["t0", "t1", "t2"]
    assert where(str(tmp_path / "saved"))[2] == f"{tmp_path / 'saved'}[row 2]"


def test_a_dataset_loading_script_is_never_run(tmp_path):
    """Row 13 of issue 22: `prepare --input hf:FOLDER` on a folder with a loading script (FOLDER/FOLDER.py) is
    refused in one line and the script does not run, even with HF_DATASETS_TRUST_REMOTE_CODE=1 (which turned
    scripts on in datasets 2.20-3.x unless the caller passes trust_remote_code=False)."""
    pytest.importorskip("datasets")
    evil, marker = tmp_path / "evil", tmp_path / "ran"
    evil.mkdir()
    (evil / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\nimport datasets\n"
                                  "class Evil(datasets.GeneratorBasedBuilder):\n    pass\n")
    env = {**os.environ, "HF_DATASETS_TRUST_REMOTE_CODE": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "gptforge", "prepare", "--input", f"hf:{evil}", "--out",
                        str(tmp_path / "out"), "--no-progress"], capture_output=True, text=True, timeout=300,
                       cwd=tmp_path, env=env)
    assert not marker.exists()
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("gptforge: error:")]
    assert len(errors) == 1 and "cannot load dataset" in errors[0] and "Traceback" not in r.stderr, r.stderr


def test_datasets_floor_has_scripts_off_by_default():
    """datasets 2.20 stopped running loading scripts by default (before it they ran with only a warning)."""
    project = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]
    for extra in ("hf", "dev"):
        spec = next(d for d in project["optional-dependencies"][extra] if d.startswith("datasets"))
        floor = tuple(int(x) for x in spec.split(">=")[1].split(",")[0].split(".")[:2])
        assert floor >= (2, 20), spec


def test_links_loops_and_duplicates_read_each_file_once(tmp_path):
    """Row 6 of issue 22: a `**` glob followed folder links around loops (two loops: an endless walk; one loop:
    the same file read 41 times). Now each real folder is walked once and each real file read once."""
    d = tmp_path / "d"
    (d / "a" / "b").mkdir(parents=True)
    (d / "a" / "x.txt").write_text("hello\n")
    (d / "a" / "b" / "y.txt").write_text("world\n")
    (d / "t.txt").write_text("top\n")
    (d / "a" / "b" / "up").symlink_to("..")  # loop to the parent
    (d / "a" / "root").symlink_to(d)  # loop to the top
    (d / "a" / "dup.txt").symlink_to("x.txt")  # the same file under a second name
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "e.txt").write_text("linked\n")
    (d / "linked").symlink_to(tmp_path / "elsewhere")  # a linked folder is still read, once
    want = sorted(str(p) for p in (d / "a" / "x.txt", d / "a" / "b" / "y.txt", d / "t.txt",
                                   tmp_path / "elsewhere" / "e.txt"))
    # first in a child under a time and memory limit, so that a regression fails rather than hangs
    r = run_gptforge("prepare", "--input", f"{d}/**/*.txt", "--out", str(tmp_path / "out"), "--val-fraction", "0",
                     "--no-progress", timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["documents"] == 4 and meta["splits"]["train"] == len("hello\nworld\ntop\nlinked\n") + 4, meta
    for spec in (f"{d}/**/*.txt", str(d), [f"{d}/**", str(d / "a" / "dup.txt"), str(d / "t.txt")]):
        assert sorted(os.path.realpath(s.path) for s in resolve_inputs(spec)) == want, spec
