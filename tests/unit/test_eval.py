"""gptforge eval (built-in part): scoring against direct forwards, perplexity / bits per byte, local
multiple-choice tasks (ours, HellaSwag's and ARC's own formats), chat models, results table / JSON /
TensorBoard, errors; train.eval_tasks agrees with `gptforge eval` on the same checkpoint."""

from __future__ import annotations

import json
import math

import pytest
import torch

from support.eval_fixtures import reverse_task, sort_task
from gptforge.cli import main
from gptforge.data.tasks import load_task
from gptforge.hf.inference import load_for_inference
from gptforge.objectives.scoring import encode_pair, loglikelihoods, rolling_logprob, score_task
from support.stage_fixtures import sft_args, sft_reverse_run, write_jsonl, reverse_conversations  # noqa: F401


def _direct(model, ctx, cont):
    x = torch.tensor([ctx + cont])
    lp = torch.log_softmax(model(x[:, :-1]).float(), -1)[0]
    return sum(lp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont))


def test_loglikelihoods_match_a_direct_forward_whatever_the_batching(trained_run):
    model, tok, _ = load_for_inference(str(trained_run), "cpu")
    texts = [("ROMEO: ", "what say you"), ("To be, or not", " to be"), ("a", "b"), ("KING", " HENRY:\nNo")]
    pairs = [encode_pair(tok, c, t) for c, t in texts]
    assert pairs[0] == (tok.encode("ROMEO:"), tok.encode("ROMEO: what say you")[len(tok.encode("ROMEO:")):])
    one = loglikelihoods(model, pairs, batch_size=1)
    many = loglikelihoods(model, pairs, batch_size=16)
    for (ctx, cont), (a, ga), (b, gb) in zip(pairs, one, many):
        assert abs(a - _direct(model, ctx, cont)) < 1e-4 and abs(a - b) < 1e-4 and ga == gb
    # is_greedy is true exactly when the continuation is the argmax path
    ctx = tok.encode("ROMEO:\n")
    greedy = []
    for _ in range(3):
        greedy.append(int(model(torch.tensor([ctx + greedy]))[0, -1].argmax()))
    (_, g1), (_, g2) = loglikelihoods(model, [(ctx, greedy), (ctx, greedy[:2] + [(greedy[2] + 1) % 60])])
    assert g1 and not g2
    # a context longer than the model's is cut on the left, as the harness does
    long_ctx = tok.encode("x" * 200)
    (lp, _), = loglikelihoods(model, [(long_ctx, cont)])
    assert abs(lp - _direct(model, long_ctx[-(64 - len(cont) + 1):], cont)) < 1e-4
    # a continuation longer than the context is scored in pieces of the context's length, each seeing the 64
    # tokens before it: after an end-of-text token that is exactly the rolling log-probability of the text
    text = tok.encode("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 3)
    assert len(text) > 2 * 64
    (lp, g), = loglikelihoods(model, [([tok.eos_id], text)], batch_size=2)
    ref, n = rolling_logprob(model, [tok.eos_id, *text])
    assert n == len(text) and abs(lp - ref) < 1e-3 and not g
    ctx = tok.encode("ROMEO:\n")
    whole, c = ctx + text, len(ctx)
    (lp2, _), = loglikelihoods(model, [(ctx, text)])
    spans = [(a, min(a + 64, len(whole))) for a in range(c, len(whole), 64)]
    assert len(spans) == 3 and abs(lp2 - sum(_direct(model, whole[max(0, b - 65):a], whole[a:b]) for a, b in spans)) < 1e-3


def test_rolling_logprob_covers_every_token_once_and_ranks_add_up(trained_run):
    model, tok, _ = load_for_inference(str(trained_run), "cpu")
    ids = tok.encode("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 5)
    assert len(ids) > 3 * 64
    total, n = rolling_logprob(model, ids)
    assert n == len(ids) - 1
    # windows of the whole context: each predicts its tokens from the window alone
    ref = 0.0
    for a in range(1, len(ids), 64):
        b = min(a + 64, len(ids))
        ref += _direct(model, ids[max(0, b - 65):a], ids[a:b])
    assert abs(total - ref) < 1e-3
    parts = [rolling_logprob(model, ids, rank=r, world=3) for r in range(3)]
    assert sum(n for _, n in parts) == n and abs(sum(t for t, _ in parts) - total) < 1e-3
    # more context per token (stride 16) can only be judged by its own sum: every token still counted once
    assert rolling_logprob(model, ids, stride=16)[1] == n


def test_text_perplexity_and_bits_per_byte(trained_run, char_data, tmp_path, capsys):
    out = tmp_path / "ppl.json"
    assert main(["eval", "--checkpoint", str(trained_run), "--text", str(char_data), "--text-tokens", "4000",
                 "--out", str(out), "--tensorboard=false"]) == 0
    r = json.loads(out.read_text())["results"][0]
    m = {k: v["value"] for k, v in r["metrics"].items()}
    assert r["examples"] == 4000 and r["bytes"] == 4000  # the char tokenizer on ASCII: one byte per token
    assert abs(m["bits_per_byte"] - m["loss"] / math.log(2)) < 1e-9 and abs(m["perplexity"] - math.exp(m["loss"])) < 1e-6
    val = json.loads((trained_run / "metrics.jsonl").read_text().splitlines()[-1].replace("NaN", "null"))
    losses = [json.loads(x)["val/loss"] for x in (trained_run / "metrics.jsonl").read_text().splitlines()
              if "val/loss" in x]
    assert val and abs(m["loss"] - losses[-1]) < 0.15 * losses[-1], (m, losses)  # the trainer's val loss
    assert m["loss"] < math.log(tok_vocab(trained_run)) - 0.5  # well below a uniform guess
    table = capsys.readouterr().out
    assert "bits_per_byte" in table and "perplexity" in table


def tok_vocab(run) -> int:
    return load_for_inference(str(run), "cpu")[1].vocab_size


def test_trained_task_above_chance_untrained_at_chance(sft_reverse_run, tmp_path, capsys):
    rev, srt = reverse_task(tmp_path / "reverse.jsonl"), sort_task(tmp_path / "sort.jsonl")
    assert main(["eval", "--checkpoint", str(sft_reverse_run), "--tasks", f"{rev},{srt}"]) == 0
    step = json.loads((sft_reverse_run / "checkpoints").glob("step_*").__next__().joinpath(
        "trainer_state.json").read_text())["step"]
    res = json.loads((sft_reverse_run / "eval" / f"step_{step:07d}.json").read_text())
    assert res["chat"] is True  # an SFT checkpoint: through its chat template
    got = {r["name"]: r for r in res["results"]}
    acc_rev, se_rev = got["reverse"]["metrics"]["acc"]["value"], got["reverse"]["metrics"]["acc"]["stderr"]
    acc_sort, se_sort = got["sort"]["metrics"]["acc"]["value"], got["sort"]["metrics"]["acc"]["stderr"]
    assert got["reverse"]["examples"] == 60 and got["sort"]["examples"] == 120
    assert acc_rev >= 0.9, got["reverse"]["metrics"]  # chance is 0.25
    assert abs(acc_sort - 0.25) < 3 * se_sort + 0.02, got["sort"]["metrics"]
    assert 0 <= se_rev < 0.1 and abs(se_sort - math.sqrt(acc_sort * (1 - acc_sort) / 119)) < 1e-9
    lines = capsys.readouterr().out.splitlines()
    assert any(line.split()[:2] == ["reverse", "acc"] and line.split()[-1] == "60" for line in lines), lines
    # TensorBoard: eval/reverse/acc at the checkpoint's step
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(sft_reverse_run / "tb"))
    acc.Reload()
    ev = acc.Scalars("eval/reverse/acc")
    assert ev[-1].step == step and abs(ev[-1].value - acc_rev) < 1e-6
    # the same task without the chat template: the model was never trained on that format
    assert main(["eval", "--checkpoint", str(sft_reverse_run), "--tasks", str(rev), "--chat", "false",
                 "--out", str(tmp_path / "plain.json"), "--tensorboard=false"]) == 0
    plain = json.loads((tmp_path / "plain.json").read_text())["results"][0]["metrics"]["acc"]["value"]
    assert plain < acc_rev - 0.3, (plain, acc_rev)


def test_hellaswag_and_arc_formats(tmp_path):
    hs = write_jsonl(tmp_path / "hs.jsonl", [{"activity_label": "Cooking", "ctx_a": "A man cuts onions.",
                                               "ctx_b": "he", "endings": ["cries [title] a lot.", "sings.",
                                                                          "runs  away.", "sleeps."],
                                               "label": "0"}])
    ex = load_task(hs).examples[0]
    assert ex.context == "Cooking: A man cuts onions. He" and ex.label == 0
    assert ex.choices == ("cries. a lot.", "sings.", "runs away.", "sleeps.")
    arc = write_jsonl(tmp_path / "arc.jsonl", [
        {"question": "Which is a gas?", "choices": {"text": ["ice", "steam"], "label": ["A", "B"]},
         "answerKey": "B"},
        {"question": {"stem": "2+2?", "choices": [{"text": "3", "label": "1"}, {"text": "4", "label": "2"}]},
         "answerKey": "2"}])
    a, b = load_task(arc).examples
    assert (a.context, a.choices, a.label) == ("Question: Which is a gas?\nAnswer:", ("ice", "steam"), 1)
    assert (b.context, b.choices, b.label) == ("Question: 2+2?\nAnswer:", ("3", "4"), 1)


@pytest.mark.parametrize("line,words", [
    ('{"context": "a", "choices": ["x", "y"], "label": 2}', ["label", "0..1"]),
    ('{"context": "a", "choices": ["x"], "label": 0}', ["at least two"]),
    ('{"context": "a", "label": 0}', ["missing choices"]),
    ('{"context": "a", "choices": ["x", "y"]', ["not valid JSON"]),
    ('{"question": "q", "choices": {"text": ["x"], "label": ["A"]}, "answerKey": "C"}', ["answerKey 'C'"]),
])
def test_bad_task_files_are_one_line_errors(trained_run, tmp_path, capsys, line, words):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "a", "choices": ["x", "y"], "label": 0}\n' + line + "\n")
    assert main(["eval", "--checkpoint", str(trained_run), "--tasks", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{bad}:2" in err and all(w in err for w in words), err


def test_eval_option_errors(trained_run, tmp_path, capsys):
    for argv, words in ((["--checkpoint", str(trained_run)], "nothing to evaluate"),
                        (["--checkpoint", str(tmp_path / "nope"), "--text", "x"], "does not exist"),
                        (["--checkpoint", str(trained_run), "--tasks", str(tmp_path / "none.jsonl")], "does not exist")):
        assert main(["eval", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and words in err, err


def test_train_eval_tasks_agree_with_gptforge_eval(trained_run, tmp_path):
    """SFT with train.eval_tasks: eval/reverse/acc logged at steps 20 and 40 (and rising); the last one equals
    `gptforge eval` on the final checkpoint."""
    rev = reverse_task(tmp_path / "reverse.jsonl", n=40)
    data = write_jsonl(tmp_path / "conv.jsonl", reverse_conversations(400))
    out = tmp_path / "run"
    assert main(["sft", *sft_args(out, data, f"--init-from={trained_run}", "--train.max_steps=40",
                                  "--train.micro_batch=8", "--train.warmup_steps=5", "--train.eval_every=20",
                                  f"--train.eval_tasks={rev}", "--train.log_every=20")]) == 0
    logged = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    accs = {r["step"]: r["eval/reverse/acc"] for r in logged if "eval/reverse/acc" in r}
    assert sorted(accs) == [20, 40], accs
    assert main(["eval", "--checkpoint", str(out), "--tasks", str(rev), "--out", str(tmp_path / "e.json")]) == 0
    final = json.loads((tmp_path / "e.json").read_text())["results"][0]["metrics"]["acc"]["value"]
    assert abs(final - accs[40]) < 1e-9, (final, accs)
    model, tok, _ = load_for_inference(str(out), "cpu")
    r = score_task(model, tok, load_task(rev), chat=True)
    assert abs(r["metrics"]["acc"][0] - final) < 1e-9 and len(r["per_example"]) == 40
