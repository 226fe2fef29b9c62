"""Training settings end to end, each checked by a number a wrong implementation would miss: the logged learning
rate of train.schedule=wsd with decay_fraction and min_lr_ratio (every param group's), weight_decay on the
matrices only (the saved parameters after one step against a hand-computed AdamW update from the initial weights),
grad_clip > 0 (the gradient AdamW saw has norm grad_clip and the direction of the unclipped one) and
activation_checkpointing (each block's forward recomputed in backward; losses, gradient norms and weights equal to
a run without it)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_args
from gptforge.checkpoint import list_checkpoints, load_model, model_config
from gptforge.cli import main
from gptforge.model import gpt
from gptforge.model.gpt import build_model

ADAMW = ["--train.optimizer=adamw", "--train.schedule=constant", "--train.warmup_steps=0", "--train.log_every=1"]
LR, WD, CLIP, BETA1, BETA2, EPS = 1e-2, 0.5, 0.05, 0.9, 0.99, 1e-8


def rows(run_dir) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "train/loss" in r]


def saved_state(run_dir) -> dict:
    """The last checkpoint's tensors by name: {"model": {name: tensor}, "optim": {"state": ..., "param_groups": ...}}."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    ck = list_checkpoints(run_dir)[-1]
    dcp_to_torch_save(ck, run_dir / "state.pt")
    return torch.load(run_dir / "state.pt", weights_only=False)


# ---- train.schedule=wsd --------------------------------------------------------------------------------------
def test_wsd_schedule_logs_the_formula_lr_for_every_group(tmp_path, char_data):
    """10 steps, 2 of warmup, decay over the last half (from step 5) to 0.2 x peak, under the preset's Muon (each
    group its own peak: Muon's muon_lr, AdamW's train.lr). Decay starts at int(10 x (1 - 0.5)) = 5 with factor 1
    and falls linearly to the floor at step 10 (after the last one): 1 - 0.8 x (step - 5) / 5."""
    assert main(["pretrain", *tiny_args(tmp_path, char_data, "--train.max_steps=10", "--train.optimizer=muon",
                                        "--train.schedule=wsd", "--train.decay_fraction=0.5",
                                        "--train.min_lr_ratio=0.2", "--train.warmup_steps=2", "--train.lr=3e-3",
                                        "--train.muon_lr=0.02", "--train.log_every=1")]) == 0
    factor = [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 0.84, 0.68, 0.52, 0.36]  # steps 1..10 (0-based 0..9)
    r = rows(tmp_path)
    assert [x["step"] for x in r] == list(range(1, 11))
    peaks = {"train/lr": 3e-3, "train/lr_muon": 0.02, "train/lr_embed": 3e-3, "train/lr_scalar": 3e-3}
    for key, peak in peaks.items():
        got = [x[key] for x in r]
        assert got == pytest.approx([f * peak for f in factor], rel=1e-12, abs=0), key


# ---- weight_decay and grad_clip: one AdamW step, read back from the checkpoint ---------------------------------
@pytest.fixture(scope="module")
def one_step(tmp_path_factory, char_data):
    """One AdamW step at lr 1e-2, weight_decay 0.5, no warmup: clipped at 0.05, and not clipped (grad_clip=0)."""
    out = {}
    for name, clip in (("clipped", CLIP), ("unclipped", 0)):
        d = tmp_path_factory.mktemp(name)
        assert main(["pretrain", *tiny_args(d, char_data, "--train.max_steps=1", *ADAMW, f"--train.lr={LR}",
                                            f"--train.weight_decay={WD}", f"--train.grad_clip={clip}",
                                            f"--train.beta1={BETA1}", f"--train.beta2={BETA2}")]) == 0
        out[name] = d
    return out


def test_weight_decay_applies_to_matrices_only(one_step):
    """After one step each saved parameter equals AdamW's update computed here in float64 from the initial weights
    (build_model with train.seed) and the gradient AdamW stored (exp_avg / (1 - beta1)):
    p1 = p0 (1 - lr wd) - lr g / (|g| + eps), wd = 0.5 for 2-D tensors (embeddings, linear weights), 0 for
    norms and biases. Decay on a LayerNorm gain (1.0) would be off by lr x wd = 5e-3, none on a matrix by ~1e-4."""
    run = one_step["clipped"]
    state = saved_state(run)
    p0 = {n: p.detach().double() for n, p in
          build_model(model_config(list_checkpoints(run)[-1]), "cpu", seed=1337).named_parameters()}
    groups = {n: g["weight_decay"] for g in state["optim"]["param_groups"] for n in g["params"]}
    assert {n for n, wd in groups.items() if wd == WD} == {n for n in p0 if p0[n].dim() >= 2}
    assert {n for n, wd in groups.items() if wd == 0.0} == {n for n in p0 if p0[n].dim() < 2}
    worst = 0.0
    for name, init in p0.items():
        st = state["optim"]["state"][name]
        g = st["exp_avg"].double() / (1 - BETA1)
        assert torch.allclose(st["exp_avg_sq"].double(), (1 - BETA2) * g * g, rtol=1e-5, atol=1e-20), name
        wd = WD if init.dim() >= 2 else 0.0
        want = init * (1 - LR * wd) - LR * g / (g.abs() + EPS)
        err = (state["model"][name].double() - want).abs().max().item()
        worst = max(worst, err)
        assert err < 1e-6, f"{name}: off by {err:.2e} from AdamW with weight decay {wd}"
    assert worst < 1e-6


def test_grad_clip_scales_the_whole_gradient_to_the_limit(one_step):
    """grad_clip=0.05: the gradient AdamW received has total norm 0.05 and is the unclipped run's gradient times
    0.05 / its norm (one factor for all parameters); the logged train/grad_norm is the norm before clipping."""
    clipped, unclipped = saved_state(one_step["clipped"]), saved_state(one_step["unclipped"])
    grad = lambda s: {n: st["exp_avg"].double() / (1 - BETA1) for n, st in s["optim"]["state"].items()}  # noqa: E731
    gc, gu = grad(clipped), grad(unclipped)
    norm_u = torch.sqrt(sum((g * g).sum() for g in gu.values())).item()
    norm_c = torch.sqrt(sum((g * g).sum() for g in gc.values())).item()
    logged = [rows(one_step[k])[0]["train/grad_norm"] for k in ("clipped", "unclipped")]
    assert logged[0] == pytest.approx(norm_u, rel=1e-5) and logged[1] == pytest.approx(norm_u, rel=1e-5)
    assert norm_u > 10 * CLIP  # clipping is active
    assert norm_c == pytest.approx(CLIP, rel=1e-5)
    scale = CLIP / (norm_u + 1e-6)  # torch's clip coefficient
    for n in gu:
        assert torch.allclose(gc[n], gu[n] * scale, rtol=1e-5, atol=1e-12), n


# ---- activation_checkpointing -------------------------------------------------------------------------------
def test_activation_checkpointing_recomputes_blocks_and_changes_no_number(tmp_path, char_data, monkeypatch):
    """The blocks' forward runs twice per training step with checkpointing (once more in backward) and once
    without; losses, gradient norms and the final weights agree (the same arithmetic, recomputed)."""
    calls = {"grad": 0}
    forward = gpt.Block.forward

    def counted(self, *args, **kwargs):
        calls["grad"] += torch.is_grad_enabled()  # training forwards and backward's recomputation, not evaluation
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(gpt.Block, "forward", counted)
    runs, counts = {}, {}
    for ckpt in ("false", "true"):
        calls["grad"] = 0
        runs[ckpt] = tmp_path / ckpt
        assert main(["pretrain", *tiny_args(runs[ckpt], char_data, "--train.max_steps=3", *ADAMW,
                                            f"--train.activation_checkpointing={ckpt}")]) == 0
        counts[ckpt] = calls["grad"]
    assert counts == {"false": 2 * 3, "true": 2 * 2 * 3}  # 2 layers x 3 steps, recomputed once with checkpointing
    a, b = rows(runs["false"]), rows(runs["true"])
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        assert abs(x["train/loss"] - y["train/loss"]) < 1e-6 and abs(x["train/grad_norm"] - y["train/grad_norm"]) < 1e-6
    wa, wb = (load_model(list_checkpoints(runs[k])[-1]).state_dict() for k in ("false", "true"))
    assert max((wa[n] - wb[n]).abs().max().item() for n in wa) < 1e-6
