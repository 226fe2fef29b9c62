"""Property-based tests (hypothesis): whatever a user types or a file holds, the config loader, the option
parser and the data parsers answer with a result or a one-line UserError, never another exception."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gptforge.config.loader import file_args, load_file, parse_config
from gptforge.config.schema import Config
from gptforge.data.preference import read_pairs, to_pair
from gptforge.data.records import DataStats
from gptforge.data.sft import read_conversations, to_messages
from gptforge.data.sources import iter_json
from gptforge.data.tokenizer import build_tokenizer
from gptforge.errors import UserError
from gptforge.options import _fields

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
KEYS = sorted(_fields(Config))  # every real config key: model.n_layer, train.lr, ...
SECTIONS = sorted({k.split(".")[0] for k in KEYS})

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                    st.sampled_from(["0", "-1", "1e9", "nan", "inf", "auto", "cpu", "cuda:0", "none", "true", ""]))
keys = st.one_of(st.sampled_from(KEYS), st.text(min_size=1, max_size=10).map(lambda s: "train." + s),
                 st.text(min_size=1, max_size=12))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                           st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                           max_leaves=12)


def _user_error_is_one_line(e: UserError) -> None:
    msg = str(e)
    assert msg and "\n" not in msg.strip() and "Traceback" not in msg, msg


def _config_or_user_error(argv: list[str]) -> None:
    try:
        cfg = parse_config(argv)
    except UserError as e:
        _user_error_is_one_line(e)
        return
    assert isinstance(cfg, Config)
    # a Config that got through is valid: the checks promised by config/validate.py hold
    t = cfg.train
    assert t.lr > 0 and math.isfinite(t.lr) and 0 <= t.beta1 < 1 and 0 <= t.beta2 < 1
    assert t.log_every >= 1 and t.micro_batch >= 1 and t.grad_accum >= 1 and t.eval_every >= 0
    assert cfg.model.n_layer >= 1 and cfg.model.d_ff >= 1 and cfg.model.d_model % cfg.model.n_head == 0
    assert 0 <= cfg.model.dropout < 1


def _arg(key: str, value) -> str:
    if isinstance(value, bool):
        value = "true" if value else "false"
    return f"--{key}={value}"


@SETTINGS
@given(st.lists(st.tuples(keys, scalars), max_size=4))
def test_command_line_gives_a_config_or_one_line(pairs):
    _config_or_user_error([_arg(k, v) for k, v in pairs if not str(k).startswith("-")])


@SETTINGS
@given(st.dictionaries(st.one_of(st.sampled_from(SECTIONS), st.text(max_size=8)),
                       st.one_of(st.dictionaries(st.one_of(st.sampled_from([k.split(".", 1)[1] for k in KEYS]),
                                                           st.text(max_size=8)), json_values, max_size=3),
                                 json_values), max_size=3))
def test_config_file_gives_a_config_or_one_line(data):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "c.json"
        path.write_text(json.dumps(data))
        _config_or_user_error(["--config", str(path)])


@SETTINGS
@given(st.binary(max_size=200), st.sampled_from([".toml", ".yaml", ".json", ".yml"]))
def test_config_file_bytes_give_a_table_or_one_line(raw, suffix):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / ("c" + suffix)
        path.write_bytes(raw)
        try:
            args = file_args(load_file(path), f"in {path}")
        except UserError as e:
            _user_error_is_one_line(e)
            return
        assert all(a.startswith("--") for a in args)


# ---- data parsers ------------------------------------------------------------------------------------------
@SETTINGS
@given(st.lists(st.one_of(st.binary(max_size=40), json_values.map(lambda v: json.dumps(v).encode())), max_size=6),
       st.booleans())
def test_jsonl_bytes_give_values_or_one_line(lines, skip):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "x.jsonl"
        path.write_bytes(b"\n".join(lines))
        bad: list[tuple[str, str]] = []
        try:
            values = list(iter_json(str(path), (lambda w, why: bad.append((w, why))) if skip else None))
        except UserError as e:
            assert not skip, "skip_bad must skip, not stop"
            _user_error_is_one_line(e)
            return
        for where, value in values:
            assert where.startswith(str(path)) and isinstance(where, str)
            json.dumps(value).encode("utf-8")  # only text that can be encoded: no lone surrogates
        for where, _ in bad:  # every skipped line is named by its place
            assert where.startswith(str(path))


@SETTINGS
@given(json_values)
def test_sft_and_preference_records_give_messages_or_one_line(obj):
    for parse in (to_messages, to_pair):
        try:
            parse(obj, "f.jsonl:1")
        except UserError as e:
            _user_error_is_one_line(e)
            assert str(e).startswith("f.jsonl:1"), str(e)


message = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "bot", ""]),
                                 "content": st.one_of(st.text(max_size=8), st.integers())})
record = st.one_of(json_values, st.fixed_dictionaries({"messages": st.lists(message, max_size=4)}),
                   st.fixed_dictionaries({"prompt": st.one_of(st.text(max_size=8), st.lists(message, max_size=2)),
                                          "chosen": st.one_of(st.text(max_size=8), st.lists(message, max_size=2)),
                                          "rejected": st.one_of(st.text(max_size=8),
                                                                st.lists(message, max_size=2))}))


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer("char", ["abcdefghij system user assistant \n"])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(record.map(lambda v: json.dumps(v).encode()), st.binary(max_size=30)), min_size=1,
                max_size=6), st.booleans())
def test_sft_and_dpo_files_give_data_or_one_line(tok, lines, skip):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "data.jsonl"
        path.write_bytes(b"\n".join(lines))
        try:
            convs, stats = read_conversations(str(path), skip)
            assert convs and isinstance(stats, DataStats)
        except UserError as e:
            _user_error_is_one_line(e)
        try:
            pairs, stats = read_pairs(str(path), tok, 32, "truncate", skip)
            assert pairs and all(not (p.chosen.input_ids.tolist() == p.rejected.input_ids.tolist()
                                      and p.chosen.labels.tolist() == p.rejected.labels.tolist()) for p in pairs)
        except UserError as e:
            _user_error_is_one_line(e)
