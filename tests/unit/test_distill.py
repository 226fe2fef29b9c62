"""Distillation (gptforge distill, gptforge.objectives.distill): the loss against a hand computation in float64,
a student initialised from its teacher at zero KL, exact resume, chat data, a different tokenizer refused in one
line, and the result read by chat/eval like any checkpoint."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import tiny_args
from gptforge.cli import main
from gptforge.objectives.distill import DistillObjective, distill_terms
from support.stage_fixtures import reverse_conversations, write_jsonl


def _hand(hs, ws, ht, wt, y, vocab, teacher_vocab, tau):
    """sum over counted rows of tau^2 * sum_v p log(p/q), and of -log softmax(z_s)[y], in numpy float64."""
    kl = ce = 0.0
    for h, g, label in zip(hs.numpy(), ht.numpy(), y.tolist()):
        if label == -100:
            continue
        zs = ws.numpy()[:vocab] @ h
        zt = np.full(vocab, -np.inf)
        zt[:teacher_vocab] = wt.numpy()[:teacher_vocab] @ g
        p = np.exp(zt / tau - np.max(zt / tau))
        p /= p.sum()
        q = np.exp(zs / tau - np.max(zs / tau))
        q /= q.sum()
        kl += tau * tau * sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)
        ce += -(zs[label] - np.max(zs) - math.log(np.exp(zs - np.max(zs)).sum()))
    return kl, ce


@pytest.mark.parametrize("teacher_vocab,tau", [(6, 2.0), (5, 1.0)])
def test_kl_and_ce_match_a_hand_computation(teacher_vocab, tau):
    g = torch.Generator().manual_seed(0)
    n, d, dt, vocab = 7, 5, 3, 6
    hs = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    ws = torch.randn(8, d, generator=g, dtype=torch.float64, requires_grad=True)  # 2 padded rows: never compared
    ht = torch.randn(n, dt, generator=g, dtype=torch.float64)
    wt = torch.randn(9, dt, generator=g, dtype=torch.float64)  # the teacher pads its own way (3 rows)
    y = torch.tensor([0, 3, -100, 5, 1, -100, 2])
    got = distill_terms(hs, ws, ht, wt, y, vocab=vocab, teacher_vocab=teacher_vocab, tau=tau)
    want = _hand(hs.detach(), ws.detach(), ht, wt, y, vocab, teacher_vocab, tau)
    assert abs(got[0].item() - want[0]) < 1e-10 and abs(got[1].item() - want[1]) < 1e-10, (got, want)
    assert got[0].item() > 0.1
    # chunks of 3 rows (checkpointed each) give the same values and the same gradients as one chunk
    (got[0] + 0.3 * got[1]).backward()
    g1 = (hs.grad.clone(), ws.grad.clone())
    hs.grad = ws.grad = None
    chunked = distill_terms(hs, ws, ht, wt, y, vocab=vocab, teacher_vocab=teacher_vocab, tau=tau, chunk_rows=3)
    assert torch.allclose(chunked, got, rtol=0, atol=1e-12)
    (chunked[0] + 0.3 * chunked[1]).backward()
    assert torch.allclose(hs.grad, g1[0], atol=1e-12) and torch.allclose(ws.grad, g1[1], atol=1e-12)
    assert ws.grad[vocab:].abs().max() == 0  # padded rows take no gradient
    # the gradient of the KL is tau * (q - p) per logit (Hinton): check it on the student's logits
    zs = (hs.detach() @ ws.detach()[:vocab].T).requires_grad_(True)
    kl = distill_terms(zs, torch.eye(vocab, dtype=torch.float64), ht, wt, y, vocab=vocab,
                       teacher_vocab=teacher_vocab, tau=tau)[0]
    kl.backward()
    zt = torch.full((n, vocab), -math.inf, dtype=torch.float64)
    zt[:, :teacher_vocab] = ht @ wt[:teacher_vocab].T
    expect = tau * (torch.softmax(zs.detach() / tau, -1) - torch.softmax(zt / tau, -1)) * (y != -100)[:, None]
    assert torch.allclose(zs.grad, expect, atol=1e-12)


def test_objective_mixes_kl_and_ce_and_validates_on_ce():
    from gptforge.model.gpt import GPTConfig, build_model

    cfg = GPTConfig(n_layer=1, d_model=16, n_head=2, d_ff=32, block_size=8, vocab_size=16).complete()
    teacher = build_model(cfg, torch.device("cpu"), seed=1)
    student = build_model(cfg, torch.device("cpu"), seed=2)
    ids = torch.randint(0, 12, (2, 8), generator=torch.Generator().manual_seed(0))
    labels = ids.roll(-1, 1)
    labels[:, -1] = -100
    batch = {"input_ids": ids, "labels": labels}
    obj = DistillObjective(teacher, vocab=12, alpha=0.25, temperature=2.0)
    loss, m = obj(student, batch)
    assert abs(loss.item() - (0.25 * m["kl"] + 0.75 * m["ce"]).item()) < 1e-6 and m["kl"].item() > 0
    zs, zt = student(ids)[..., :12].double(), teacher(ids)[..., :12].double()
    valid = labels != -100
    ce = torch.nn.functional.cross_entropy(zs[valid], labels[valid])
    p, logq = torch.softmax(zt / 2, -1), torch.log_softmax(zs / 2, -1)
    kl = 4 * (p * (p.log() - logq)).sum(-1)[valid].mean()
    assert abs(m["ce"].item() - ce.item()) < 1e-5 and abs(m["kl"].item() - kl.item()) < 1e-5
    student.eval()
    val, _ = obj(student, batch)
    assert abs(val.item() - ce.item()) < 1e-5  # validation: the student's CE over the real vocabulary


COMMON = ["--train.log_every=1", "--train.prefetch=0"]


def _distill(teacher, out, data, *extra):
    a = [x for x in tiny_args(out, data, *COMMON) if not x.startswith("--model.")]
    small = ["--model.n_layer=1", "--model.d_model=32", "--model.n_head=2", "--model.d_ff=64", "--model.block_size=64"]
    return ["distill", *a, *small, f"--teacher={teacher}", *extra]


def _rows(run) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"train/loss"' in x]


def test_student_initialised_from_its_teacher_has_zero_kl(trained_run, char_data, tmp_path):
    out = tmp_path / "self"
    args = [x for x in _distill(trained_run, out, char_data) if not x.startswith("--model.")]
    assert main([*args, f"--init-from={trained_run}", "--distill.alpha=1", "--train.max_steps=1"]) == 0
    (r,) = _rows(out)
    assert abs(r["train/loss"]) < 1e-6 and abs(r["train/kl"]) < 1e-6 and r["train/ce"] > 1.0, r


def test_distill_resumes_exactly_and_the_result_is_a_normal_checkpoint(trained_run, char_data, tmp_path, capsys):
    full, split = tmp_path / "full", tmp_path / "split"
    assert main(_distill(trained_run, full, char_data, "--train.max_steps=4", "--distill.temperature=2")) == 0
    assert main(_distill(trained_run, split, char_data, "--train.max_steps=4", "--distill.temperature=2",
                         "--train.save_every=2", "--train.stop_after=2")) == 0
    assert main(_distill(trained_run, split, char_data, "--train.max_steps=4", "--distill.temperature=2",
                         "--train.resume=auto")) == 0
    a, b = _rows(full), _rows(split)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        for k in ("train/loss", "train/kl", "train/ce"):
            assert x[k] == y[k], (k, x["step"], x[k], y[k])
    assert a[0]["train/kl"] > 0.1 and abs(a[0]["train/loss"] - 0.5 * (a[0]["train/kl"] + a[0]["train/ce"])) < 1e-5
    capsys.readouterr()
    # eval and generate read it as any checkpoint (a student of its own, smaller shape)
    res = tmp_path / "ppl.json"
    assert main(["eval", "--checkpoint", str(full), "--text", str(char_data), "--text-tokens", "500",
                 "--out", str(res), "--tensorboard=false"]) == 0
    loss = json.loads(res.read_text())["results"][0]["metrics"]["loss"]["value"]
    assert 0 < loss < 6
    assert main(["generate", "--checkpoint", str(full), "--prompt", "ROMEO:", "--max-new-tokens", "8",
                 "--seed", "1"]) == 0
    assert "ROMEO:" in capsys.readouterr().out


def test_chat_conversations_distill_and_chat_reads_the_result(trained_run, tmp_path, capsys):
    data = write_jsonl(tmp_path / "chats.jsonl", reverse_conversations(40))
    out = tmp_path / "chat"
    assert main(_distill(trained_run, out, data, "--train.max_steps=2", "--distill.alpha=0.7")) == 0
    assert "sft data:" in capsys.readouterr().out  # detected as conversations (distill.data=auto)
    rows = _rows(out)
    assert len(rows) == 2 and all(r["train/kl"] > 0 and r["train/ce"] > 0 for r in rows)
    ck = sorted((out / "checkpoints").iterdir())[-1]
    assert (ck / "chat_template.jinja").is_file()
    from gptforge.hf.inference import load_for_inference

    model, tok, chat = load_for_inference(str(out), "cpu")
    teacher_tok = load_for_inference(str(trained_run), "cpu")[1]
    assert chat and model.cfg.d_model == 32 and tok.hf.to_str() == teacher_tok.hf.to_str()


def _other_run(tmp_path, capsys):
    """-> (a text with another character vocabulary, a one-step run trained on it)."""
    other = tmp_path / "other.txt"
    other.write_text("a tiny text with another character vocabulary\n" * 200)
    other_run = tmp_path / "other"
    assert main(["pretrain", *tiny_args(other_run, other, "--train.max_steps=1")]) == 0
    capsys.readouterr()
    return other, other_run


def _refused(capsys, argv) -> str:
    """The command fails with exit status 2 and one line of error -> that line."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_a_different_tokenizer_is_refused_in_one_line(trained_run, tmp_path, capsys):
    other, other_run = _other_run(tmp_path, capsys)
    err = _refused(capsys, _distill(trained_run, tmp_path / "o", other, f"--init-from={other_run}",
                                    "--train.max_steps=1"))
    assert "another tokenizer" in err and "--init-from" in err, err
    err = _refused(capsys, _distill(trained_run, tmp_path / "o", other, "--data.tokenizer=char",
                                    "--train.max_steps=1"))
    assert "leave data.tokenizer out" in err, err
    assert main(["distill", f"--data.path={other}", "--train.max_steps=1"]) == 2
    assert "--teacher" in capsys.readouterr().err


def test_a_hugging_face_teacher_gives_its_checkpoints_loss(trained_run, trained_hf, char_data, tmp_path, capsys):
    """--teacher HF_FOLDER (export-hf of trained_run: 80 output rows, not the checkpoint's padded 128): the same
    student and data give the step-1 loss, KL and CE of the checkpoint teacher; another tokenizer is refused in
    one line, whether it comes with the student (--init-from) or with the data (a prepared dataset)."""
    rows = []
    for teacher, out in ((trained_run, tmp_path / "ck"), (trained_hf, tmp_path / "hf")):
        assert main(_distill(teacher, out, char_data, "--train.max_steps=1", "--distill.temperature=2")) == 0
        rows += _rows(out)
    a, b = rows
    assert a["train/kl"] > 0.1 and a["train/ce"] > 1.0, a
    for k in ("train/loss", "train/kl", "train/ce", "train/grad_norm"):
        assert abs(a[k] - b[k]) < 1e-6, (k, a[k], b[k])
    assert json.loads((trained_hf / "config.json").read_text())["vocab_size"] < 128
    _, other_run = _other_run(tmp_path, capsys)
    err = _refused(capsys, _distill(trained_hf, tmp_path / "o", char_data, f"--init-from={other_run}",
                                    "--train.max_steps=1"))
    assert "another tokenizer" in err and "--init-from" in err and str(trained_hf) in err, err
    other_hf = tmp_path / "other_hf"
    assert main(["export-hf", "--checkpoint", str(other_run), "--out", str(other_hf)]) == 0
    capsys.readouterr()
    err = _refused(capsys, _distill(other_hf, tmp_path / "o", char_data, "--train.max_steps=1"))
    assert f"the data ({char_data}" in err and "another tokenizer" in err and str(other_hf) in err, err


def test_inference_mask_leaves_a_heads_output_alone():
    """load_for_inference masks padded vocabulary rows in the logits; a teacher's hidden states (a forward with a
    head) are not logits, even when d_model equals the padded vocabulary."""
    from gptforge.hf.inference import _mask_logits_from
    from gptforge.model.gpt import GPTConfig, build_model
    from gptforge.objectives.distill import _hidden

    cfg = GPTConfig(n_layer=1, d_model=16, n_head=2, d_ff=32, block_size=8, vocab_size=16).complete()
    model = build_model(cfg, torch.device("cpu"), seed=0).eval()
    _mask_logits_from(model, 10)
    ids = torch.arange(8)[None]
    with torch.no_grad():
        assert torch.isinf(model(ids)[..., 10:]).all() and torch.isfinite(model(ids)[..., :10]).all()
        assert torch.isfinite(model(ids, head=_hidden)).all()
