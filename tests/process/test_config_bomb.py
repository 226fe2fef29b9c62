"""A YAML "billion laughs" config (issue 22, row 7): 9 levels of 9 aliases is under 500 bytes on disk and 387M
leaves once walked. safe_load keeps it small (shared references); the error message must too: one short
line, under a 2 GiB address-space limit (the old message repr()'d the whole value: 3.7 GB, MemoryError)."""

from __future__ import annotations

import resource
import subprocess
import sys

import pytest

from gptforge.errors import show_value

LIMIT = 2 * 1024**3


def bomb(indent: str = "", levels: int = 9) -> str:
    """A YAML list whose items are 9 lol, 9 of those, ... (levels deep), each item an alias of the one above."""
    doc = f"\n{indent}- &l0 [lol,lol,lol,lol,lol,lol,lol,lol,lol]"
    for i in range(1, levels):
        doc += f"\n{indent}- &l{i} [{','.join([f'*l{i - 1}'] * 9)}]"
    return doc + "\n"


def _limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (LIMIT, LIMIT))


@pytest.mark.parametrize("where", ["key", "section"])
def test_billion_laughs_config_is_a_short_one_line_error(tmp_path, where):
    doc = "train:\n  lr:" + bomb("  ") if where == "key" else "model:" + bomb()
    cfg = tmp_path / "bomb.yaml"
    cfg.write_text(doc)
    assert cfg.stat().st_size < 500
    r = subprocess.run([sys.executable, "-m", "gptforge", "pretrain", "--config", str(cfg)], capture_output=True,
                       text=True, preexec_fn=_limit_memory, timeout=300)
    err = r.stderr.strip()
    assert r.returncode != 0 and "Traceback" not in err and "MemoryError" not in err, err[-2000:]
    assert len(err.splitlines()) == 1 and len(err) < 300, err[:2000]
    assert ("'train.lr'" if where == "key" else "section 'model'") in err and "[['lol', 'lol'" in err, err


def test_show_value_is_bounded_for_any_shape():
    a: list = []
    a.append(a)  # a cycle, as YAML aliases can make
    for v, want in ((a, "[[[[...]]]]"), ("x" * 10**7, "'xxx"), (b"y" * 10**7, "b'yyy"), (10**5000, "<an int of"),
                    ({"k": [1, {"m": "c" * 1000}] * 1000}, "{'k': [1, {'m':"), (-1.5, "-1.5"), ("a\nb", "'a\\nb'")):
        s = show_value(v)
        assert s.startswith(want) and len(s) <= 80 and "\n" not in s, (s, want)
