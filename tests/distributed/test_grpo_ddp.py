"""`gptforge grpo` under 2-rank DDP (torchrun, gloo, CPU) equals one process with the same global batch: each
rank samples the groups of its own prompts (the seeds depend on the prompt, not the rank), DDP averages the
gradients of the per-rank mean losses, the logged reward / KL / lengths are the means over all completions, the
step's tokens their sum; a generative train.eval_tasks file scored rank-parallel equals one process."""

from __future__ import annotations

import json

from _harness import torchrun
from conftest import TINY_MODEL
from gptforge.cli import main

COMMON = ["--train.precision=fp32", "--train.progress=false", "--train.tensorboard=false", "--train.sample_tokens=0",
          "--train.eval_every=0"]


def rows(run) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"train/reward"' in x]


def test_grpo_ddp_equals_single_process(tmp_path):
    pairs = [(a, b) for a in range(10) for b in range(10)]
    conv = [{"messages": [{"role": "user", "content": f"{a}+{b}"}, {"role": "assistant", "content": str(a + b)}]}
            for a, b in pairs]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(c) + "\n" for c in conv))
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": f"{a}+{b}", "answer": a + b}) + "\n"
                                              for a, b in pairs))
    model = [x for x in TINY_MODEL if not x.startswith("--model.block_size")] + ["--model.block_size=32"]
    sft = tmp_path / "sft"
    assert main(["sft", *model, *COMMON, f"--data.path={tmp_path / 'sft.jsonl'}", f"--train.out_dir={sft}",
                 "--train.max_steps=20", "--train.micro_batch=16", "--train.lr=3e-3", "--data.val_fraction=0"]) == 0

    def grpo(out, micro_batch):
        return ["grpo", *COMMON, f"--init-from={sft}", f"--data.path={tmp_path / 'p.jsonl'}", f"--train.out_dir={out}",
                f"--train.micro_batch={micro_batch}", "--train.lr=1e-3", "--train.max_steps=3", "--train.log_every=1",
                "--grpo.group_size=4", "--grpo.max_new_tokens=4", "--grpo.kl_coef=0.1",
                f"--train.eval_tasks={tmp_path / 'p.jsonl'}", "--train.eval_tasks_limit=15"]

    single, ddp = tmp_path / "single", tmp_path / "ddp"
    assert main(grpo(single, 4)) == 0
    torchrun(2, grpo(ddp, 2), timeout=240)
    a, b = rows(single), rows(ddp)
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        assert x["train/reward"] == y["train/reward"] and x["train/completion_len"] == y["train/completion_len"]
        for k in ("train/loss", "train/kl", "train/accuracy"):
            assert abs(x[k] - y[k]) < 1e-5, (k, x["step"], x[k], y[k])
    assert a[-1]["train/kl"] > 0  # it did train
    # the log line's real tokens: a step's prompt + completion tokens of every rank; a generative eval task
    # (train.eval_tasks, at the last step) split over the ranks gives one process's accuracy
    assert [x["perf/step_tokens"] for x in a] == [y["perf/step_tokens"] for y in b]
    # and the run's token total (checkpoints, train.max_tokens) is their sum over the steps on either
    from gptforge.checkpoint import STATE_FILE, list_checkpoints

    totals = [json.loads((list_checkpoints(r)[-1] / STATE_FILE).read_text())["tokens_seen"] for r in (single, ddp)]
    assert totals[0] == totals[1] == sum(x["perf/step_tokens"] for x in a)
    evals = [[json.loads(x) for x in (r / "metrics.jsonl").read_text().splitlines() if "eval/p/acc" in x]
             for r in (single, ddp)]
    assert [len(e) for e in evals] == [1, 1] and evals[0][0]["eval/p/acc"] == evals[1][0]["eval/p/acc"]
    assert evals[0][0]["eval/p/reward"] == evals[1][0]["eval/p/reward"]
