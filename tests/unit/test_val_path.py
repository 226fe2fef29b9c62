"""data.val_path: a fixed validation set. A pretrain run's val loss on it equals `gptforge eval --text` on the same
file for the same checkpoint; the whole training data trains; the set is tokenized with the training data's
tokenizer (a char vocab's unknown characters: <|unk|>), cached by content (each machine's own cache prepares
its own copy, byte-identical); ranks and micro-batches score exactly the same tokens; SFT and DPO take a JSONL
of conversations / pairs; mistakes are one line."""

from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import TINY_MODEL, tiny_args
from gptforge.cli import main
from gptforge.data.loader import FullPassLoader, open_tokens, read_meta
from gptforge.data.prepare import ensure_prepared, ensure_val_prepared, prepare
from gptforge.data.tokenizer import UNK, load_tokenizer
from gptforge.errors import UserError
from gptforge.model.gpt import GPTConfig, build_model
from gptforge.objectives.lm import LMObjective
from gptforge.objectives.scoring import rolling_logprob
from support.stage_fixtures import reverse_conversations, sft_args, write_jsonl

BLOCK = 64
VAL_CHARS = 13 * BLOCK + 21  # not a multiple of the context: the last window is a partial one


@pytest.fixture(scope="module")
def texts(tmp_path_factory, shakespeare_small):
    d = tmp_path_factory.mktemp("val_path")
    text = shakespeare_small.read_text(encoding="utf-8")
    train, val = d / "train.txt", d / "val.txt"
    train.write_text(text[:60_000], encoding="utf-8")
    val.write_text(text[-VAL_CHARS + 1:] + "\u00e9", encoding="utf-8")  # é: not in the training text
    assert "\u00e9" not in text[:60_000] and len(val.read_text(encoding="utf-8")) == VAL_CHARS
    return d


@pytest.fixture(scope="module")
def run(tmp_path_factory, texts):
    out = tmp_path_factory.mktemp("val_path_run")
    # no padded vocabulary rows: gptforge eval masks them (never a token's), the training-time val loss scores them
    train_dir = ensure_prepared(str(texts / "train.txt"), "char", cache=os.environ["GPTFORGE_CACHE"], val_fraction=0.0)
    vocab = load_tokenizer(train_dir).vocab_size
    assert main(["pretrain", *tiny_args(out, texts / "train.txt", "--train.max_steps=10", "--train.eval_every=5",
                                        f"--data.val_path={texts / 'val.txt'}", f"--model.vocab_size={vocab}")]) == 0
    return out


def val_rows(run_dir) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "val/loss" in r]


def test_val_loss_equals_gptforge_eval_text(run, texts, tmp_path, capsys):
    rows = val_rows(run)
    assert [r["step"] for r in rows] == [5, 10]
    assert [r["train/tokens"] for r in rows] == [5 * 4 * BLOCK, 10 * 4 * BLOCK]  # steps x micro-batch x context
    assert 0 < rows[0]["train/seconds"] < rows[1]["train/seconds"]
    out = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(run), "--text", str(texts / "val.txt"), "--out", str(out),
                 "--tensorboard=false"]) == 0
    r = json.loads(out.read_text())["results"][0]
    assert r["examples"] == VAL_CHARS  # every character predicted once (after an eos)
    assert abs(r["metrics"]["loss"]["value"] - rows[-1]["val/loss"]) < 2e-5, (r["metrics"], rows)
    assert abs(rows[0]["val/loss"] - rows[-1]["val/loss"]) > 1e-3  # the numbers move: the comparison can fail


def test_all_training_data_trains_and_val_is_eos_then_the_text(run, texts):
    cache = os.environ["GPTFORGE_CACHE"]
    train_dir = ensure_prepared(str(texts / "train.txt"), "char", cache=cache, val_fraction=0.0)
    meta = read_meta(train_dir)
    assert meta["splits"] == {"train": 60_000 + 1, "val": 0}  # every character (and the eos) trains
    val_dir = ensure_val_prepared(str(texts / "val.txt"), train_dir, cache=cache)
    tok = load_tokenizer(train_dir)
    ids = [tok.eos_id, *tok.encode((texts / "val.txt").read_text(encoding="utf-8"))]
    assert open_tokens(val_dir, "val").tolist() == ids and ids[-1] == tok.hf.token_to_id(UNK)
    assert read_meta(val_dir)["unknown"] == 1 and read_meta(val_dir)["splits"]["train"] == 0
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["data"]["val_path"] == str(texts / "val.txt")


def test_start_line_says_what_validates(texts, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["pretrain", *tiny_args(out, texts / "train.txt", "--train.max_steps=1",
                                        f"--data.val_path={texts / 'val.txt'}")]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("model:"))
    assert f"validation: {texts / 'val.txt'} ({VAL_CHARS + 1:,} tokens" in line
    assert "all of the training data trains, no split taken" in line
    assert "characters not in the char vocabulary, counted as <|unk|>: 1)" in line


def test_cache_keys_on_content_and_each_cache_prepares_its_own(texts, tmp_path):
    train_dir = ensure_prepared(str(texts / "train.txt"), "char", cache=tmp_path / "c0", val_fraction=0.0,
                                progress=False)
    val = tmp_path / "a" / "val.txt"
    val.parent.mkdir()
    val.write_bytes((texts / "val.txt").read_bytes())
    first = ensure_val_prepared(str(val), train_dir, cache=tmp_path / "c1", progress=False)
    os.utime(val, (1, 1))  # another mtime, same content: the same prepared set
    assert ensure_val_prepared(str(val), train_dir, cache=tmp_path / "c1", progress=False) == first
    # a copy on "another machine" (its own folder and cache): prepared there, the same bytes under the same name
    other = tmp_path / "b" / "val.txt"
    other.parent.mkdir()
    other.write_bytes(val.read_bytes())
    second = ensure_val_prepared(str(other), train_dir, cache=tmp_path / "c2", progress=False)
    assert second.name == first.name and second.parent != first.parent
    assert (second / "val.bin").read_bytes() == (first / "val.bin").read_bytes()
    val.write_text("Another text entirely, long enough.\n" * 3, encoding="utf-8")  # new content: a new set
    third = ensure_val_prepared(str(val), train_dir, cache=tmp_path / "c1", progress=False)
    assert third != first and len(open_tokens(third, "val")) == 1 + 3 * 36


@pytest.mark.parametrize("micro_batch,dp", [(4, 1), (3, 1), (2, 2), (5, 3)])
def test_every_layout_scores_the_same_tokens_as_eval(texts, tmp_path, micro_batch, dp):
    """Trainer.evaluate's mean over batches and ranks (all_reduce_mean) of the loader's batches is the token
    mean of rolling_logprob (gptforge eval --text), whatever the micro-batch and the number of ranks."""
    train_dir = ensure_prepared(str(texts / "train.txt"), "char", cache=tmp_path, val_fraction=0.0, progress=False)
    val_dir = ensure_val_prepared(str(texts / "val.txt"), train_dir, cache=tmp_path, progress=False)
    model = build_model(GPTConfig(vocab_size=128, block_size=BLOCK, n_layer=1, n_head=2, d_model=32, d_ff=64),
                        seed=0).eval()
    ids = open_tokens(val_dir, "val").tolist()
    logp, n = rolling_logprob(model, ids)
    assert n == VAL_CHARS
    objective, per_rank, forwards = LMObjective("plain"), [], set()
    with torch.no_grad():
        for rank in range(dp):
            loader = FullPassLoader(val_dir, "val", micro_batch, BLOCK, dp_rank=rank, dp_size=dp)
            losses = [objective(model, b)[0].item() for b in loader.iter_eval(1)]  # max_batches: not used
            forwards.add(len(losses))
            per_rank.append(sum(losses) / len(losses))
    assert len(forwards) == 1  # every rank runs as many forwards
    assert abs(sum(per_rank) / dp - (-logp / n)) < 1e-5


def test_sft_and_dpo_validate_on_the_given_file(tmp_path, trained_run, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", reverse_conversations(40, seed=1))
    val = write_jsonl(tmp_path / "val.jsonl", reverse_conversations(7, seed=2))
    assert main(["sft", *sft_args(tmp_path / "sft", train, "--train.max_steps=2", f"--data.val_path={val}")]) == 0
    out = capsys.readouterr().out
    assert "| 7 validation examples (data.val_path" in out and "40 conversations" in out, out
    assert val_rows(tmp_path / "sft")[-1]["step"] == 2
    pairs = [{"prompt": w, "chosen": w[::-1], "rejected": w[1:] + w[0]} for w in ("abce", "fcad", "bdfa", "eacf",
                                                                                   "dbfe", "cefa")]
    train_p, val_p = write_jsonl(tmp_path / "p.jsonl", pairs * 4), write_jsonl(tmp_path / "pv.jsonl", pairs[:3])
    assert main(["dpo", *sft_args(tmp_path / "dpo", train_p, f"--init-from={trained_run}", "--train.max_steps=1",
                                  f"--data.val_path={val_p}")]) == 0
    assert "24 training, 3 validation pairs (data.val_path)" in capsys.readouterr().out
    assert len(val_rows(tmp_path / "dpo")) == 1


def one_line_error(capsys, argv) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if "gptforge: error:" in x]  # (a progress bar may precede it)
    assert len(lines) == 1 and "Traceback" not in err and err.rstrip().endswith(lines[0]), err
    return lines[0]


def test_mistakes_are_one_line(texts, tmp_path, capsys, char_data):
    base = tiny_args(tmp_path / "r", texts / "train.txt", "--train.max_steps=1")
    err = one_line_error(capsys, ["pretrain", *base, f"--data.val_path={tmp_path / 'nope.txt'}"])
    assert "data.val_path" in err and "nope.txt" in err and "not found" in err
    (tmp_path / "empty.txt").write_text("")
    err = one_line_error(capsys, ["pretrain", *base, f"--data.val_path={tmp_path / 'empty.txt'}"])
    assert "data.val_path" in err and "no text" in err
    (tmp_path / "short.txt").write_text("too short")
    err = one_line_error(capsys, ["pretrain", *base, f"--data.val_path={tmp_path / 'short.txt'}"])
    assert "data.val_path" in err and "has 10 tokens, fewer than one window" in err and "block_size" in err
    err = one_line_error(capsys, ["pretrain", *base, "--data.val_path= "])
    assert "config key 'data.val_path'" in err
    # a prepared dataset made with another tokenizer is refused; the training data's own split is fine
    other = tmp_path / "other"
    prepare([str(texts / "val.txt")], other, "char", val_fraction=0.1, progress=False)
    err = one_line_error(capsys, ["pretrain", *base, f"--data.val_path={other}"])
    assert "data.val_path" in err and "another tokenizer" in err
    with pytest.raises(UserError, match="must be in"):
        prepare([str(texts / "val.txt")], tmp_path / "x", "char", val_fraction=0.5, progress=False)


def test_val_fraction_zero_without_val_path_trains_without_validation(tmp_path, capsys, shakespeare_small):
    assert main(["pretrain", *tiny_args(tmp_path / "r", shakespeare_small, "--train.max_steps=2",
                                        "--data.val_fraction=0")]) == 0
    assert "has no validation split (data.val_fraction 0): no val loss" in capsys.readouterr().out
    assert val_rows(tmp_path / "r") == []
    assert TINY_MODEL  # the tiny model of conftest
