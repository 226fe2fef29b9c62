"""DPO: ln 2 at step 0, rewards that separate on synthetic pairs, precomputed == live reference, pair formats."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from conftest import read_losses
from gptforge.cli import main
from gptforge.data.preference import PairLoader, read_pairs, to_pair
from gptforge.data.tokenizer import char_tokenizer
from gptforge.errors import UserError
from gptforge.model.gpt import GPTConfig, build_model
from gptforge.objectives.dpo import DPOObjective, precompute_reference, sequence_logps
from gptforge.parallel.mesh import DistEnv
from support.stage_fixtures import LETTERS, sft_args, sft_reverse_run, write_jsonl  # noqa: F401

LN2 = math.log(2)


def reverse_pairs(n: int, seed: int = 1) -> list[dict]:
    """chosen: the word reversed (what SFT taught); rejected: the word rotated by one (plausible, wrong)."""
    r = random.Random(seed)
    out = []
    while len(out) < n:
        w = "".join(r.choice(LETTERS) for _ in range(4))
        if w[::-1] != w[1:] + w[0]:  # e.g. 'abab': chosen == rejected, a pair DPO drops (nothing to learn)
            out.append({"prompt": w, "chosen": w[::-1], "rejected": w[1:] + w[0]})
    return out


def rows(run_dir) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_pair_formats():
    p, c, r = to_pair({"prompt": "q", "chosen": "a", "rejected": "b"}, "f:1")
    assert p == [{"role": "user", "content": "q"}] and c[0]["content"] == "a" and r[0]["role"] == "assistant"
    prompt = [{"role": "system", "content": "S"}, {"role": "user", "content": "q"}]
    full = lambda a: prompt + [{"role": "assistant", "content": a}]  # noqa: E731
    p, c, r = to_pair({"prompt": prompt, "chosen": full("a"), "rejected": full("b")}, "f:2")
    assert p == prompt and c == [{"role": "assistant", "content": "a"}] and r[0]["content"] == "b"
    p, c, r = to_pair({"chosen": full("a"), "rejected": full("b")}, "f:3")  # prompt = the shared prefix
    assert p == prompt and c[0]["content"] == "a"
    with pytest.raises(UserError, match="f:4: missing 'rejected'"):
        to_pair({"prompt": "q", "chosen": "a"}, "f:4")


def test_loss_is_ln2_when_policy_equals_reference_and_live_equals_precomputed(tmp_path):
    tok = char_tokenizer(["abcdef"])
    f = write_jsonl(tmp_path / "p.jsonl", reverse_pairs(10))
    pairs, stats = read_pairs(str(f), tok, 32)
    assert stats.records == 10 and len(pairs) == 10
    # only the reply and its <|im_end|> are scored
    assert all(p.chosen.n_labels == 5 and p.rejected.n_labels == 5 for p in pairs)
    cfg = GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, d_model=32, d_ff=64)
    policy, ref = build_model(cfg, seed=0), build_model(cfg, seed=0)
    loader = PairLoader(pairs, 4, tok.pad_id, seed=0)
    table = precompute_reference(ref, loader, DistEnv(), micro_batch=3)
    batch = loader.next_batch()
    for ls in (0.0, 0.2):
        loss, m = DPOObjective(0.1, ls, ref_model=ref)(policy, batch)
        assert abs(loss.item() - LN2) < 1e-6 and m["reward_margin"].item() == 0.0
    loader.set_reference(table)
    live_batch = batch
    batch = loader.collate(loader.epoch_order(0)[:4])
    assert torch.equal(batch["input_ids"], live_batch["input_ids"])
    with torch.no_grad():
        assert torch.allclose(batch["ref_logps"], sequence_logps(ref, batch), atol=1e-5)
    with torch.no_grad():  # a different policy: live and precomputed reference agree
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        a, _ = DPOObjective(0.5, 0.1)(policy, batch)
        b, _ = DPOObjective(0.5, 0.1, ref_model=ref)(policy, live_batch)
    assert abs(a.item() - b.item()) < 1e-6 and abs(a.item() - LN2) > 1e-3


def _logsigmoid64(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def test_label_smoothing_at_a_nonzero_margin_is_conservative_dpo(tmp_path):
    """At margin 0 every dpo.label_smoothing gives ln 2; away from it the loss must be cDPO's closed form
    -(1 - eps) log sigmoid(beta m) - eps log sigmoid(-beta m), m = (pc - pr) - (rc - rr), here with the
    sequence log-probs computed independently (float64 log-softmax of the logits over the counted labels)."""
    tok = char_tokenizer(["abcdef"])
    pairs, _ = read_pairs(str(write_jsonl(tmp_path / "p.jsonl", reverse_pairs(8))), tok, 32)
    cfg = GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, d_model=32, d_ff=64)
    policy, ref = build_model(cfg, seed=0), build_model(cfg, seed=0)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(3)
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    batch = PairLoader(pairs, 4, tok.pad_id, seed=0).next_batch()

    def logps64(model) -> list[float]:
        with torch.no_grad():
            lp = torch.log_softmax(model(batch["input_ids"]).double(), dim=-1)
        counted = batch["labels"] != -100
        tok_lp = lp.gather(-1, batch["labels"].clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return (tok_lp * counted).sum(-1).tolist()

    pol, rf = logps64(policy), logps64(ref)
    B, beta = len(pol) // 2, 0.5
    margins = [(pol[i] - pol[B + i]) - (rf[i] - rf[B + i]) for i in range(B)]
    assert max(abs(m) for m in margins) > 1 and min(abs(m) for m in margins) > 1e-2, margins  # not 0 (ln 2 for all)
    got = {}
    for eps in (0.0, 0.1, 0.3):
        want = sum(-(1 - eps) * _logsigmoid64(beta * m) - eps * _logsigmoid64(-beta * m) for m in margins) / B
        with torch.no_grad():
            loss, metrics = DPOObjective(beta, eps, ref_model=ref)(policy, batch)
        got[eps] = loss.item()
        assert abs(got[eps] - want) < 1e-5 * max(1.0, abs(want)), (eps, got[eps], want, margins)
        assert metrics["reward_margin"].item() == pytest.approx(beta * sum(margins) / B, abs=1e-5)
    # the smoothing is visible here: each eps moves the loss by far more than the tolerance above
    assert min(abs(got[0.0] - got[0.1]), abs(got[0.1] - got[0.3])) > 1e-2, got


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", reverse_pairs(200))


def dpo_args(out, data, init, *extra):
    return ["dpo", *sft_args(out, data, f"--init-from={init}", "--train.micro_batch=8", "--train.warmup_steps=0",
                             "--train.lr=1e-3", "--train.log_every=1", "--dpo.beta=0.1", *extra)]


def test_dpo_starts_at_ln2_and_rewards_separate(tmp_path, sft_reverse_run, pairs_file):
    out = tmp_path / "dpo"
    assert main(dpo_args(out, pairs_file, sft_reverse_run, "--train.max_steps=40")) == 0
    r = [x for x in rows(out) if "train/reward_margin" in x]
    assert len(r) == 40
    assert abs(r[0]["train/loss"] - LN2) < 1e-4, r[0]
    assert r[0]["train/reward_margin"] == 0.0
    first = lambda k: sum(x[f"train/{k}"] for x in r[:5]) / 5  # noqa: E731
    last = lambda k: sum(x[f"train/{k}"] for x in r[-5:]) / 5  # noqa: E731
    assert last("reward_margin") > first("reward_margin") + 0.3, (first("reward_margin"), last("reward_margin"))
    assert last("reward_acc") > max(0.8, first("reward_acc")), (first("reward_acc"), last("reward_acc"))
    assert last("loss") < LN2 - 0.1
    ck = sorted((out / "checkpoints").iterdir())[-1]
    assert (ck / "chat_template.jinja").is_file()


def test_precomputed_and_live_reference_give_the_same_losses(tmp_path, sft_reverse_run, pairs_file):
    runs = {}
    for pre in ("true", "false"):
        out = tmp_path / f"ref_{pre}"
        assert main(dpo_args(out, pairs_file, sft_reverse_run, "--train.max_steps=40", "--train.stop_after=5",
                             f"--dpo.precompute_ref={pre}")) == 0
        runs[pre] = [x for x in rows(out) if "train/loss" in x]
    a, b = runs["true"], runs["false"]
    assert len(a) == len(b) == 5
    for x, y in zip(a, b):
        for k in ("train/loss", "train/reward_margin", "train/logps_chosen"):
            assert abs(x[k] - y[k]) < 1e-5, (k, x[k], y[k])
    assert read_losses(tmp_path / "ref_true")[0] == pytest.approx(LN2, abs=1e-4)


def test_dpo_needs_init_from(tmp_path, pairs_file, capsys):
    assert main(["dpo", f"--data.path={pairs_file}", "--train.max_steps=1"]) == 2
    assert "--init-from" in capsys.readouterr().err
