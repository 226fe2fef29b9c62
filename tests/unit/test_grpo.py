"""GRPO (gptforge.objectives.grpo, objectives.rewards): advantages, clipped loss and KL against a hand computation
in float64; the built-in rewards and a user's function; seeded batched rollouts; a reward that favours one
token raises its probability in a few steps."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from gptforge.errors import UserError
from gptforge.model.engine import Engine, Params
from gptforge.model.gpt import GPTConfig, build_model
from gptforge.objectives.grpo import grpo_loss, group_advantages, kl_k3, rollout, token_logps
from gptforge.objectives.rewards import build_reward, final_answer, score

SMALL = dict(n_layer=2, n_head=4, d_model=32, d_ff=64, block_size=32, vocab_size=40, init_std=0.2)


# ---- the objective against a hand computation ------------------------------------------------------------
def test_group_advantages_by_hand():
    r = torch.tensor([[1.0, 0.0, 0.0], [2.0, 2.0, 2.0]], dtype=torch.float64)
    a = group_advantages(r, eps=1e-4)
    std = math.sqrt(((2 / 3) ** 2 + 2 * (1 / 3) ** 2) / 2)  # sample std (n - 1) of 1, 0, 0
    assert a[0].tolist() == pytest.approx([(2 / 3) / (std + 1e-4), (-1 / 3) / (std + 1e-4), (-1 / 3) / (std + 1e-4)],
                                          abs=1e-12)
    assert a[1].tolist() == [0.0, 0.0, 0.0]  # a flat group teaches nothing


def test_loss_and_kl_by_hand():
    lp = torch.tensor([[-1.0, -1.5, -0.5], [-0.3, -1.3, 0.0]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[-1.1, -2.0, -0.7], [-0.3, -1.0, 0.0]], dtype=torch.float64)
    ref = torch.tensor([[-0.9, -2.2, -0.7], [-0.5, -1.2, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[0, 1, 1], [1, 1, 0]], dtype=torch.bool)  # a prompt token in row 0, padding in row 1
    adv = torch.tensor([1.5, -0.8], dtype=torch.float64)
    eps, beta = 0.2, 0.05
    loss, stats = grpo_loss(lp, old, ref, adv, mask, eps, beta)

    def tok(l, o, r, a):
        ratio = math.exp(l - o)
        pg = -min(ratio * a, min(max(ratio, 1 - eps), 1 + eps) * a)
        return pg + beta * (math.exp(r - l) - (r - l) - 1), math.exp(r - l) - (r - l) - 1, ratio
    # row 0 (A > 0): token 1 ratio exp(0.5) = 1.65 > 1.2: clipped; token 2 ratio exp(0.2) = 1.22: clipped too
    t01, k01, r01 = tok(-1.5, -2.0, -2.2, 1.5)
    t02, k02, r02 = tok(-0.5, -0.7, -0.7, 1.5)
    # row 1 (A < 0): token 0 ratio 1; token 1 ratio exp(-0.3) = 0.74 < 0.8: clipped
    t10, k10, _ = tok(-0.3, -0.3, -0.5, -0.8)
    t11, k11, r11 = tok(-1.3, -1.0, -1.2, -0.8)
    assert r01 > 1 + eps and r02 > 1 + eps and r11 < 1 - eps
    hand = ((t01 + t02) / 2 + (t10 + t11) / 2) / 2
    assert loss.item() == pytest.approx(hand, abs=1e-12)
    assert stats["kl"].item() == pytest.approx((k01 + k02 + k10 + k11) / 4, abs=1e-12)
    assert stats["clip_frac"].item() == pytest.approx(3 / 4, abs=1e-12)
    loss.backward()
    assert lp.grad[0, 0] == 0 and lp.grad[1, 2] == 0  # masked tokens get no gradient
    # a clipped token passes only the KL's gradient: d/dl beta * k3 / 2 tokens / 2 rows
    assert lp.grad[0, 1].item() == pytest.approx(beta * (1 - math.exp(-2.2 + 1.5)) / 4, abs=1e-12)
    # an unclipped one also the policy's: d/dl -ratio * A / 4
    assert lp.grad[1, 0].item() == pytest.approx((0.8 + beta * (1 - math.exp(-0.5 + 0.3))) / 4, abs=1e-12)
    # kl_k3 is zero where policy == reference and positive elsewhere
    assert kl_k3(ref, ref).abs().max() == 0 and (kl_k3(lp.detach(), ref)[mask] > 0).all()


# ---- rewards -------------------------------------------------------------------------------------------
def test_builtin_rewards():
    assert final_answer("so 3 + 4 = 7") == "7" and final_answer("blah #### 1,234") == "1234"
    exact = build_reward("exact")
    assert exact("the answer is 12", "12") == 1 and exact("#### 12", "x #### 12") == 1
    assert exact("12.0", "12") == 1 and exact("13", "12") == 0 and exact("no number", "12") == 0
    number = build_reward("number", tolerance=0.05)
    assert number("3.14", "3.1416") == 1 and number("3.2", "3.1416") == 0 and number("pi", "3.14") == 0
    fmt = build_reward("regex", format_regex=r"^\d+$")
    assert fmt("42", "") == 1 and fmt("42 apples", "") == 0
    both = build_reward("exact,regex", format_regex=r"^\d+$")
    assert both("7", "7") == 2 and both("it is 7", "7") == 1
    with pytest.raises(UserError, match="unknown reward 'exactly'"):
        build_reward("exactly")
    with pytest.raises(UserError, match="--grpo.format_regex"):
        build_reward("regex")
    with pytest.raises(UserError, match="not a regular expression"):
        build_reward("regex", format_regex="(")


def test_user_reward_function(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def short(completion, answer):\n    return 1.0 / (1 + len(completion))\n"
        "def bad(completion, answer):\n    return 'yes'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = build_reward("my_rewards:short")
    assert fn("abc", "") == 0.25
    assert build_reward("my_rewards:short,exact")("7", "7") == 1.5
    with pytest.raises(UserError, match="returned str, not a number"):
        score(build_reward("my_rewards:bad"), "x", "y", "my_rewards:bad")
    with pytest.raises(UserError, match="has no function 'nope'"):
        build_reward("my_rewards:nope")
    with pytest.raises(UserError, match="cannot import module 'no_such_mod_xyz'"):
        build_reward("no_such_mod_xyz:f")
    sys.modules.pop("my_rewards", None)


# ---- rollouts ------------------------------------------------------------------------------------------
class _Tok:  # ids as text: enough for rewards on token ids
    pad_id = 0

    def decode(self, ids):
        return " ".join(str(i) for i in ids)


def test_rollouts_are_seeded_and_their_logprobs_are_the_models():
    torch.manual_seed(0)
    model = build_model(GPTConfig(arch="llama", n_kv_head=2, bias=False, **SMALL), seed=3).double()
    prompts = [[5, 6, 7], [9, 1]]
    kw = dict(group_size=3, max_new_tokens=8, temperature=1.0, stop_ids=frozenset({2}))
    a = rollout(model, _Tok(), prompts, [11, 12], **kw)
    b = rollout(model, _Tok(), prompts, [11, 12], **kw)
    c = rollout(model, _Tok(), prompts, [11, 13], **kw)
    assert a.completions == b.completions and torch.equal(a.input_ids, b.input_ids)
    assert a.completions[:3] == c.completions[:3] and a.completions[3:] != c.completions[3:]
    assert len({tuple(x) for x in a.completions}) > 3  # a group's completions differ
    # each completion is what the engine samples alone with seed s * G + g
    alone = Engine(model, None).run([9, 1], Params(8, 1.0, seed=12 * 3 + 1, stop_ids=frozenset({2}))).ids
    assert a.completions[4] == alone
    # the recorded log-probs are the model's own (a full forward of the same rows), prompt and padding masked
    lp = token_logps(model, a.input_ids, a.labels)
    assert torch.allclose(lp.double(), a.old_logps, atol=1e-5) and (a.old_logps[~a.mask] == 0).all()
    assert a.mask[0, :2].sum() == 0 and a.mask[0, 2]  # prompt of 3 tokens: position 2 predicts the first


@pytest.mark.parametrize("softcap", [0.0, 5.0])
def test_logprobs_at_the_rollout_temperature_by_hand(softcap):
    """Sampled at T = 0.7: the recorded old log-probs and the loss's (plain, chunked; a soft-capped model too) are
    log softmax(logits / T) at the sampled token, by hand from a full forward; not the temperature-1 ones."""
    model = build_model(GPTConfig(arch="llama", n_kv_head=2, bias=False, logit_softcap=softcap, **SMALL),
                        seed=3).double()
    T = 0.7
    a = rollout(model, _Tok(), [[5, 6, 7], [9, 1]], [11, 12], group_size=2, max_new_tokens=6, temperature=T,
                stop_ids=frozenset({2}))
    with torch.no_grad():
        logits = model(a.input_ids).double()
    hand = torch.zeros_like(a.old_logps)
    for i, j in a.mask.nonzero().tolist():
        hand[i, j] = torch.log_softmax(logits[i, j] / T, -1)[a.labels[i, j]]
    assert (a.old_logps - hand).abs().max() < 1e-5  # the engine's float32 log-softmax of the cached forward
    for impl in ("plain", "chunked"):  # float64 here
        assert (token_logps(model, a.input_ids, a.labels, impl, T).double() - hand).abs().max() < 1e-12, impl
    t1 = token_logps(model, a.input_ids, a.labels, "plain")
    assert (t1.double() - hand)[a.mask].abs().max() > 1e-3  # temperature 1 would give other numbers
    # so the ratio starts at 1: with advantages 1 and the policy as its own reference the loss is -1, no KL
    lp = token_logps(model, a.input_ids, a.labels, "chunked", T)
    loss, stats = grpo_loss(lp, a.old_logps.to(lp.dtype), lp.detach(), torch.ones(4, dtype=lp.dtype), a.mask, 0.2, 0.1)
    assert loss.item() == pytest.approx(-1.0, abs=1e-5) and stats["clip_frac"] == 0 and stats["kl"] == 0


def test_reward_for_one_token_raises_its_probability():
    """Reward 1 for completions that contain token 7: a few GRPO steps raise p(7 | prompt) several-fold."""
    from gptforge.objectives.grpo import GRPOObjective

    model = build_model(GPTConfig(arch="llama", n_kv_head=2, bias=False, **SMALL), seed=1)
    ref = build_model(GPTConfig(arch="llama", n_kv_head=2, bias=False, **SMALL), seed=1).requires_grad_(False)
    prompts = [[3, 4], [5, 6], [8, 9], [10, 11]]
    obj = GRPOObjective(_Tok(), prompts, [""] * 4, lambda c, a: float("7" in c.split()), "test", ref,
                        group_size=8, max_new_tokens=4, temperature=1.0, kl_coef=0.01, clip_eps=0.2,
                        stop_ids=frozenset())

    def p7():
        with torch.no_grad():
            x = torch.tensor(prompts)
            return model(x)[:, -1].softmax(-1)[:, 7].mean().item()

    before = p7()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rewards = []
    for step in range(8):
        loss, m = obj(model, {"idx": torch.arange(4), "seed": torch.arange(4) + 100 * step})
        opt.zero_grad()
        loss.backward()
        opt.step()
        rewards.append(m["reward"].item())
    after = p7()
    assert after > 3 * before, (before, after, rewards)
    assert sum(rewards[-3:]) > sum(rewards[:3])


# ---- the recipe: gptforge grpo --------------------------------------------------------------------------
ADD = [(a, b) for a in range(10) for b in range(10)]


@pytest.fixture(scope="module")
def addition_sft(tmp_path_factory):
    """A tiny chat model after a few SFT steps on single-digit additions, and the GRPO prompt files."""
    import json

    from gptforge.cli import main

    from conftest import TINY_MODEL

    root = tmp_path_factory.mktemp("grpo")
    conv = [{"messages": [{"role": "user", "content": f"{a}+{b}"}, {"role": "assistant", "content": str(a + b)}]}
            for a, b in ADD]
    (root / "sft.jsonl").write_text("".join(json.dumps(c) + "\n" for c in conv))
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"{a}+{b}", "answer": a + b}) + "\n"
                                                for a, b in ADD[:80]))
    (root / "heldout.jsonl").write_text("".join(json.dumps({"prompt": f"{a}+{b}", "answer": str(a + b)}) + "\n"
                                                for a, b in ADD[80:]))
    sft = root / "sft"
    model = [x for x in TINY_MODEL if not x.startswith("--model.block_size")] + ["--model.block_size=32"]
    assert main(["sft", *model, f"--data.path={root / 'sft.jsonl'}", f"--train.out_dir={sft}", "--train.max_steps=30",
                 "--train.micro_batch=16", "--train.lr=3e-3", "--train.precision=fp32", "--train.progress=false",
                 "--train.tensorboard=false", "--train.sample_tokens=0", "--train.eval_every=0",
                 "--data.val_fraction=0"]) == 0
    return root


def grpo_args(root, out, *extra) -> list[str]:
    return ["grpo", f"--init-from={root / 'sft'}", f"--data.path={root / 'prompts.jsonl'}", f"--train.out_dir={out}",
            "--train.micro_batch=4", "--train.lr=1e-3", "--train.precision=fp32", "--train.progress=false",
            "--train.tensorboard=false", "--train.sample_tokens=0", "--grpo.group_size=4",
            "--grpo.max_new_tokens=4", "--grpo.kl_coef=0.1", *extra]


def _rows(run) -> list[dict]:
    import json

    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"train/reward"' in x]


def test_grpo_command_logs_and_resumes_exactly(tmp_path, addition_sft, capsys):
    from gptforge.cli import main

    full, split = tmp_path / "full", tmp_path / "split"
    assert main(grpo_args(addition_sft, full, "--train.max_steps=6", "--train.prefetch=0",
                          f"--data.val_path={addition_sft / 'heldout.jsonl'}", "--train.sample_tokens=4")) == 0
    out = capsys.readouterr()
    assert "held-out greedy accuracy (data.val_path, reward >= 1): " in out.out + out.err
    assert main(grpo_args(addition_sft, split, "--train.max_steps=6", "--train.save_every=3",
                          "--train.stop_after=3")) == 0
    assert main(grpo_args(addition_sft, split, "--train.max_steps=6", "--train.resume=auto")) == 0
    a, b = _rows(full), _rows(split)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(a, b):
        for k in ("train/loss", "train/reward", "train/accuracy", "train/kl", "train/completion_len"):
            assert x[k] == y[k], (k, x["step"], x[k], y[k])  # the same completions, bitwise the same numbers
    assert a[0]["train/kl"] == 0 and a[-1]["train/kl"] > 0 and all(r["train/rollout_tok_s"] > 0 for r in a)
    assert 1 <= a[0]["train/completion_len"] <= 4 and 0 <= a[0]["train/accuracy"] <= 1
    assert len({r["train/reward"] for r in a}) > 1  # the prompts differ from step to step


def _last_state(run) -> dict:
    import json

    from gptforge.checkpoint import STATE_FILE, list_checkpoints

    return json.loads((list_checkpoints(run)[-1] / STATE_FILE).read_text())


def test_grpo_token_total_budget_and_resume(tmp_path, addition_sft, monkeypatch, capsys):
    """The running token total (checkpoints, train.max_tokens) counts the tokens GRPO trains on: each rollout's
    prompt + completion ids, no padding, counted here from the rollouts themselves (2 micro-batches a step);
    train.max_tokens stops at the first step whose total reaches it; a resume keeps the total exactly."""
    import gptforge.objectives.grpo as grpo_mod
    from gptforge.cli import main

    real, calls = grpo_mod.rollout, []

    def counted(model, tok, prompts, seeds, group_size, *a, **kw):
        ro = real(model, tok, prompts, seeds, group_size, *a, **kw)
        calls.append(sum(len(prompts[i // group_size]) + len(c) for i, c in enumerate(ro.completions)))
        return ro

    monkeypatch.setattr(grpo_mod, "rollout", counted)
    args = ("--train.micro_batch=3", "--train.grad_accum=2", "--train.schedule=constant", "--train.prefetch=0")
    assert main(grpo_args(addition_sft, tmp_path / "full", "--train.max_steps=5", *args)) == 0
    per_step = [calls[i] + calls[i + 1] for i in range(0, 10, 2)]
    cum = [sum(per_step[:i + 1]) for i in range(5)]
    assert len(calls) == 10 and len(set(per_step)) > 1  # completions of several lengths
    assert _last_state(tmp_path / "full")["tokens_seen"] == cum[4]
    assert cum[4] != 5 * 6 * 32  # not 5 steps x 6 prompts x block_size, as for block_size windows
    # a budget of exactly the first 3 steps' tokens: stops after step 3
    assert main(grpo_args(addition_sft, tmp_path / "b3", f"--train.max_tokens={cum[2]}", *args)) == 0
    assert [r["step"] for r in _rows(tmp_path / "b3")] == [1, 2, 3]
    assert _last_state(tmp_path / "b3")["tokens_seen"] == cum[2]
    assert f"training until {cum[2]:,} tokens" in capsys.readouterr().out
    # one token more: step 4, across a stop after step 2 and a resume; the same rollouts as the full run
    calls.clear()
    b4 = ("--train.max_tokens", str(cum[2] + 1), *args)
    assert main(grpo_args(addition_sft, tmp_path / "b4", *b4, "--train.stop_after=2")) == 0
    assert _last_state(tmp_path / "b4")["tokens_seen"] == cum[1]
    assert main(grpo_args(addition_sft, tmp_path / "b4", *b4, "--train.resume=auto")) == 0
    assert len(calls) == 8 and [calls[i] + calls[i + 1] for i in range(0, 8, 2)] == per_step[:4]
    state = _last_state(tmp_path / "b4")
    assert state["step"] == 4 and state["tokens_seen"] == cum[3]
    assert main(grpo_args(addition_sft, tmp_path / "b4", *b4, "--train.resume=auto")) == 0
    assert f"train.max_tokens={cum[2] + 1:,} reached ({cum[3]:,} tokens), nothing to train" in capsys.readouterr().out


def test_grpo_mistakes_are_one_line(tmp_path, addition_sft, capsys):
    from gptforge.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1"}\n')
    assert main(grpo_args(addition_sft, tmp_path / "o", f"--data.path={bad}", "--train.max_steps=1")) == 2
    assert "missing 'answer'" in capsys.readouterr().err
    assert main(grpo_args(addition_sft, tmp_path / "o", "--grpo.group_size=1", "--train.max_steps=1")) == 2
    assert "grpo.group_size" in capsys.readouterr().err
    assert main(grpo_args(addition_sft, tmp_path / "o", "--grpo.reward=nope:fn", "--train.max_steps=1")) == 2
    assert "cannot import module 'nope'" in capsys.readouterr().err
    assert main(["grpo", f"--data.path={bad}", "--train.max_steps=1"]) == 2
    assert "--init-from" in capsys.readouterr().err


# ---- held-out accuracy: generative eval tasks (gptforge eval, train.eval_tasks, grpo's data.val_path) ------------
def _greedy_alone(model, tok, ids, max_new, stops) -> str:
    """One prompt's greedy completion, decoded alone (no batch), stop tokens left out."""
    r = Engine(model, tok).run(ids, Params(max_new, 0.0, stop_ids=stops))
    return tok.decode([t for t in r.ids if t not in stops])


def _task_file(path, prompts, completions, right: set[int]) -> float:
    """Prompt/answer lines whose answer is the greedy completion for the indices in `right`, a wrong one for the
    others. -> the accuracy an exact-match eval must report."""
    import json

    from gptforge.objectives.rewards import exact_match

    rows = []
    for i, (p, c) in enumerate(zip(prompts, completions)):
        answer = c if i in right else "#### no such answer"
        assert exact_match(c, answer) == float(i in right)
        rows.append({"prompt": p, "answer": answer})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return len(right) / len(prompts)


def _eval(tmp_path, run, task, *flags) -> dict:
    import json

    from gptforge.cli import main

    out = tmp_path / f"eval_{task.stem}.json"
    assert main(["eval", "--checkpoint", str(run), "--tasks", str(task), "--out", str(out), "--tensorboard=false",
                 *flags]) == 0
    return json.loads(out.read_text())["results"][0]


def test_generative_task_accuracy_chat_model(tmp_path, addition_sft):
    """A chat checkpoint: answers that are exactly its greedy completion for 7 of 12 prompts -> acc 7/12."""
    from gptforge.data.chat_template import encode_chat, stop_ids
    from gptforge.hf.inference import load_for_inference

    model, tok, _ = load_for_inference(str(addition_sft / "sft"), "cpu")
    prompts = [f"{a}+{b}" for a, b in ADD[::8][:12]]
    stops = frozenset(stop_ids(tok))
    comps = [_greedy_alone(model, tok, encode_chat(tok, [{"role": "user", "content": p}], True)[0], 5, stops)
             for p in prompts]
    want = _task_file(tmp_path / "held.jsonl", prompts, comps, {0, 2, 3, 5, 8, 9, 11})
    r = _eval(tmp_path, addition_sft / "sft", tmp_path / "held.jsonl", "--max-new-tokens", "5", "--batch-size", "5")
    assert r["examples"] == 12 and r["metrics"]["acc"]["value"] == want == 7 / 12
    assert r["metrics"]["reward"]["value"] == want
    assert [r["per_example"][str(i)]["completion"] for i in range(12)] == comps
    # another checker: the regex reward judges the same completions (the answers play no part)
    import re

    fmt = sum(re.search(r"^\d+$", c, re.DOTALL) is not None for c in comps) / 12
    r = _eval(tmp_path, addition_sft / "sft", tmp_path / "held.jsonl", "--max-new-tokens", "5", "--check", "regex",
              "--format-regex", r"^\d+$")
    assert r["metrics"]["acc"]["value"] == fmt


def test_generative_task_accuracy_base_model(tmp_path, trained_run, capsys):
    """A model without a chat template: the prompt as plain text (encode_prompt), stopped by its end tokens."""
    from gptforge.hf.inference import load_for_inference

    model, tok, _ = load_for_inference(str(trained_run), "cpu")
    prompts = ["ROMEO:", "KING HENRY", "To be, or", "First Citizen:\n", "O", "What say"]
    comps = [_greedy_alone(model, tok, tok.encode_prompt(p), 6, frozenset(tok.end_ids)) for p in prompts]
    want = _task_file(tmp_path / "plain.jsonl", prompts, comps, {1, 4})
    r = _eval(tmp_path, trained_run, tmp_path / "plain.jsonl", "--max-new-tokens", "6", "--limit", "5")
    assert r["examples"] == 5 and r["metrics"]["acc"]["value"] == 2 / 5 and want == 2 / 6
    assert "plain  acc" in capsys.readouterr().out
    from gptforge.cli import main

    assert main(["eval", "--checkpoint", str(trained_run), "--tasks", str(tmp_path / "plain.jsonl"),
                 "--check", "regex"]) == 2
    assert "--check=regex needs the pattern: --format-regex=PATTERN" in capsys.readouterr().err
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"prompt": "a", "answer": "b"}\n{"context": "a", "choices": ["b", "c"], "label": 0}\n')
    assert main(["eval", "--checkpoint", str(trained_run), "--tasks", str(mixed)]) == 2
    assert "mixed.jsonl:2: a generative task file cannot hold examples of the other kind" in capsys.readouterr().err


def test_grpo_eval_tasks_log_line_and_no_spike_warning(tmp_path, addition_sft, capsys):
    """train.eval_tasks with a generative task during grpo: eval/heldout/acc and reward at each eval, equal to
    `gptforge eval` of the checkpoint and to the data.val_path figure; the log line counts the real tokens."""
    import json

    from gptforge.cli import main
    from gptforge.data.chat_template import encode_chat
    from gptforge.hf.inference import load_for_inference
    from gptforge.train.faults import StepGuard

    run, held = tmp_path / "run", addition_sft / "heldout.jsonl"
    assert main(grpo_args(addition_sft, run, "--train.max_steps=12", "--train.eval_every=6", "--train.spike_factor=1",
                          f"--train.eval_tasks={held}", f"--data.val_path={held}", "--train.sample_tokens=4")) == 0
    out = capsys.readouterr()
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/heldout/acc" in r]
    assert [r["step"] for r in evals] == [6, 12] and all(0 <= r["eval/heldout/reward"] <= 1 for r in evals)
    final = _eval(tmp_path, run, held, "--max-new-tokens", "4", "--batch-size", "4")
    assert final["metrics"]["acc"]["value"] == evals[-1]["eval/heldout/acc"]
    assert f"held-out greedy accuracy (data.val_path, reward >= 1): {evals[-1]['eval/heldout/acc']:.4f} of 20 " \
           "prompts" in out.out
    # the log line: real tokens per step (4 prompts x 4 completions of one prompt length + their tokens), no MFU
    _, tok, _ = load_for_inference(str(run), "cpu")
    n_prompt = len(encode_chat(tok, [{"role": "user", "content": "1+2"}], True)[0])
    steps = [r for r in rows if "perf/step_tokens" in r]
    assert len(steps) == 12 and all("perf/mfu" not in r and "train/tokens" not in r for r in steps)
    for r in steps:
        assert r["perf/step_tokens"] == pytest.approx(16 * (n_prompt + r["train/completion_len"]), abs=1e-3)
    line = next(x for x in out.out.splitlines() if x.startswith("step  1/12 |"))
    assert "MFU" not in line and f"| {steps[0]['perf/step_tokens']:,.0f} tok/step |" in line and "tok/s" in line
    assert "tokens/step" not in next(x for x in out.out.splitlines() if x.startswith("training 12 steps"))
    # a loss near 0 (the KL term's share as it grows from 0): the spike check of train.spike_factor=1 warns on
    # these very losses, grpo's trainer has it off
    losses = [r["train/loss"] for r in steps]
    said = []
    guard = StepGuard(type("T", (), {"max_bad_steps": 5, "on_bad_steps": "stop", "spike_factor": 1.0})(), said.append)
    for i, loss in enumerate(losses, 1):
        guard.observe(i, loss, 1.0, True)
    assert said and "loss spike" not in out.err and all(r["train/loss_spikes"] == 0 for r in steps)


def test_example_heldout_number_is_gptforge_eval(tmp_path, addition_sft):
    """examples/grpo_arithmetic reports `gptforge eval`'s acc of its held-out file: the share of questions whose
    greedy answer, decoded one by one here, matches exactly."""
    import importlib.util
    import json

    from gptforge.cli import main
    from gptforge.data.chat_template import encode_chat, stop_ids
    from gptforge.hf.inference import load_for_inference
    from gptforge.objectives.rewards import exact_match

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("grpo_example", ROOT / "examples" / "grpo_arithmetic" / "run.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    held, out = addition_sft / "heldout.jsonl", tmp_path / "eval.json"
    cmd = example.heldout_command(addition_sft / "sft", held, out)
    assert cmd[1:4] == ["-m", "gptforge", "eval"] and main(cmd[3:]) == 0
    acc = json.loads(out.read_text())["results"][0]["metrics"]["acc"]["value"]
    model, tok, _ = load_for_inference(str(addition_sft / "sft"), "cpu")
    rows = [json.loads(x) for x in held.read_text().splitlines()]
    stops = frozenset(stop_ids(tok))
    right = [exact_match(_greedy_alone(model, tok, encode_chat(tok, [{"role": "user", "content": r["prompt"]}],
                                                                True)[0], 8, stops), r["answer"]) for r in rows]
    assert acc == sum(right) / len(rows)
