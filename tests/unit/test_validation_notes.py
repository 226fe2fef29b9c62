"""Silent results that are not errors: generate says when the context stopped it, DPO drops
(and counts) pairs whose chosen equals rejected, a JSON array skips only its non-UTF-8 records."""

from __future__ import annotations

import contextlib
import io
import json

from gptforge import cli
from gptforge.data.preference import read_pairs
from gptforge.data.sft import read_conversations
from gptforge.data.tokenizer import build_tokenizer


def test_generate_says_it_stopped_at_the_context(trained_run):
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        rc = cli.main(["generate", "--checkpoint", str(trained_run), "--prompt", "ROMEO:", "--max-new-tokens", "500",
                       "--seed", "1", "--device", "cpu"])
    assert rc == 0
    notes = [ln for ln in err.getvalue().splitlines() if ln.startswith("note:")]
    # block_size 64, prompt 6 characters: 58 new tokens (the char tokenizer has no end-of-text token sampled)
    assert notes == ["note: sample 1 stopped at the context of 64 tokens after 58 new tokens "
                     "(--max-new-tokens 500; the prompt is 6 tokens)"], err.getvalue()
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        assert cli.main(["generate", "--checkpoint", str(trained_run), "--max-new-tokens", "5", "--seed", "1"]) == 0
    assert "note:" not in err.getvalue()  # fewer tokens than the context holds: no note


def test_dpo_drops_identical_pairs_with_a_count(tmp_path):
    tok = build_tokenizer("char", ["abcdefgh system user assistant\n"])
    rows = [{"prompt": f"p{i}", "chosen": "ab", "rejected": "ab" if i % 3 == 0 else "ba"} for i in range(9)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs, stats = read_pairs(str(path), tok, 64)
    assert len(pairs) == 6 and stats.extra["identical"] == 3 and stats.records == 9 and stats.examples == 6
    assert "3 dropped as chosen identical to rejected" in stats.summary("pairs")


def test_json_array_skips_only_its_non_utf8_records(tmp_path):
    ok = '{"messages": [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "ba"}]}'
    bad = '{"messages": [{"role": "user", "content": "caf\xe9"}, {"role": "assistant", "content": "x"}]}'
    path = tmp_path / "a.json"
    path.write_bytes(("[" + ",\n".join([ok, bad, ok, bad, ok]) + "]").encode("latin-1"))
    convs, stats = read_conversations(str(path), skip_bad=True)
    assert len(convs) == 3 and stats.bad_lines == 2 and stats.first_bad.startswith(f"{path}[1]:")
