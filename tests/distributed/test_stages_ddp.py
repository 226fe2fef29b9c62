"""SFT and DPO under 2-rank DDP (and DPO under FSDP2 with a live, sharded reference) on real torchrun
(gloo, CPU) equal one process with the same global batch.

Conversations of uneven length make the ranks' label-token counts differ, so this also checks that the
SFT loss is the mean over the step's tokens on all ranks, not a mean of per-rank means. Workers must
exit 0 without gloo's exit abort ("terminate called ...", gptforge.parallel.exit): rc 0 from torchrun and no such
text in the output, else the test fails."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, read_losses, tiny_args
from gptforge.cli import main
from support.harness_tasks import write_task_yaml

pytestmark = pytest.mark.timeout(300) if hasattr(pytest.mark, "timeout") else []
STEPS = 3
CRASH_SIGNS = ("terminate called", "SIGABRT", "Signals.SIG", "ChildFailedError", "Traceback")


def _run(cmd: list[str], timeout: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    out = p.stdout + p.stderr
    bad = [s for s in CRASH_SIGNS if s in out]
    assert p.returncode == 0 and not bad, f"{cmd[:4]} rc {p.returncode}, {bad}:\n{out[-4000:]}"
    return p


def torchrun(argv: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "torchrun"
    launcher = [str(exe)] if exe.is_file() else [sys.executable, "-m", "torch.distributed.run"]
    return _run([*launcher, "--standalone", "--nproc-per-node=2", "-m", "gptforge", *argv], timeout)


def launch(argv: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    """`gptforge launch --nproc-per-node 2 -- ARGV` on a free port (launch builds and runs torchrun)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return _run([sys.executable, "-m", "gptforge", "launch", "--nproc-per-node", "2", "--port", str(port), "--",
                 *argv], timeout)


def args(out, data, *extra) -> list[str]:
    a = [x for x in tiny_args(out, "unused", *extra) if not x.startswith("--data.path=")]
    strategy = [] if any(x.startswith("--parallel.strategy=") for x in extra) else ["--parallel.strategy=ddp"]
    return a + [f"--data.path={data}", "--train.log_every=1", "--train.warmup_steps=1",
                f"--train.max_steps={STEPS}", "--data.val_fraction=0", *strategy]


def metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"train/loss"' in x]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("ddp_data")
    r = random.Random(0)
    with open(d / "chats.jsonl", "w") as f:
        for _ in range(64):
            msgs = []
            for _ in range(r.choice((1, 2, 3))):
                w = "".join(r.choice("abcdef") for _ in range(r.randint(1, 7)))
                msgs += [{"role": "user", "content": w}, {"role": "assistant", "content": w[::-1]}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    with open(d / "pairs.jsonl", "w") as f:
        for _ in range(32):
            w = "".join(r.choice("abcdef") for _ in range(r.randint(2, 6)))
            f.write(json.dumps({"prompt": w, "chosen": w[::-1], "rejected": w[1:] + w[:1] * 2}) + "\n")
    with open(d / "task.jsonl", "w") as f:  # 7 examples: the ranks' shares (4 / 3) differ
        for _ in range(7):
            w = "".join(r.choice("abcdef") for _ in range(r.randint(2, 6)))
            choices = [w[::-1], w, w[1:] + w[:1], "".join(sorted(w))]
            f.write(json.dumps({"context": w, "choices": choices, "label": 0}) + "\n")
    (d / "text.txt").write_text("".join(r.choice("abcdef \n") for _ in range(3000)))
    with open(d / "docs.jsonl", "w") as f:  # 5 documents of 30..200 characters, some longer than the context
        for _ in range(5):
            f.write(json.dumps({"text": "".join(r.choice("abcdef \n") for _ in range(r.randint(30, 200)))}) + "\n")
    write_task_yaml(d, "gf_mc", d / "task.jsonl")  # the same task through the LM Evaluation Harness
    write_task_yaml(d, "gf_docs", d / "docs.jsonl", rolling=True)
    return d


def assert_same(a: list[dict], b: list[dict], keys=("train/loss",)) -> None:
    assert len(a) == len(b) == STEPS, (len(a), len(b))
    for x, y in zip(a, b):
        for k in keys:
            assert abs(x[k] - y[k]) < 1e-5, (k, x["step"], x[k], y[k])


@pytest.mark.parametrize("packing", ["true", "false"])
def test_sft_ddp_equals_single_process(tmp_path, data, packing):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    assert main(["sft", *args(single, data / "chats.jsonl", "--train.micro_batch=4", f"--sft.packing={packing}")]) == 0
    # 2 ranks x micro-batch 1 x 2 accumulation steps: the same 4 sequences per optimizer step
    torchrun(["sft", *args(ddp, data / "chats.jsonl", "--train.micro_batch=1", "--train.grad_accum=2",
                           f"--sft.packing={packing}")])
    assert_same(metrics(single), metrics(ddp))
    losses = read_losses(single)
    assert len(set(round(x, 6) for x in losses)) == STEPS  # it did train


def test_dpo_ddp_equals_single_process(tmp_path, data):
    sft = tmp_path / "sft"
    assert main(["sft", *args(sft, data / "chats.jsonl", "--train.micro_batch=4")]) == 0
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    common = ["--train.lr=1e-3", f"--init-from={sft}", "--dpo.beta=0.5", f"--train.eval_tasks={data / 'task.jsonl'}"]
    assert main(["dpo", *args(single, data / "pairs.jsonl", "--train.micro_batch=4", *common)]) == 0
    torchrun(["dpo", *args(ddp, data / "pairs.jsonl", "--train.micro_batch=2", *common)])
    a, b = metrics(single), metrics(ddp)
    assert_same(a, b, ("train/loss", "train/reward_margin", "train/logps_chosen", "train/logps_rejected"))
    assert abs(a[0]["train/loss"] - 0.6931471805599453) < 1e-4
    # FSDP2 with a live reference model sharded the same way gives the same numbers too
    live = tmp_path / "live"
    torchrun(["dpo", *args(live, data / "pairs.jsonl", "--train.micro_batch=2", *common, "--dpo.precompute_ref=false",
                           "--parallel.strategy=fsdp")])
    assert_same(a, metrics(live), ("train/loss", "train/reward_margin"))
    # train.eval_tasks, data-parallel (shares of 4 and 3 examples, so unequal batch counts: FSDP needs every
    # rank to run as many forwards) == one process; and `gptforge eval` under torchrun == one process
    evals = [[json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if "eval/task/acc" in x]
             for run in (single, ddp, live)]
    assert [len(e) for e in evals] == [1, 1, 1], evals
    for e in evals[1:]:
        for k in ("eval/task/acc", "eval/task/acc_norm"):
            assert abs(e[0][k] - evals[0][0][k]) < 1e-9, (k, e, evals[0])
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    task_args = ["--checkpoint", str(single), "--tasks", f"{data / 'task.jsonl'},gf_mc,gf_docs", "--include-path",
                 str(data), "--text",
                 str(data / "text.txt"), "--text-tokens", "700", "--batch-size", "3", "--tensorboard=false"]
    assert main(["eval", *task_args, "--out", str(one)]) == 0
    launch(["eval", *task_args, "--out", str(two)])  # as the README says: gptforge launch ... -- eval
    assert [json.loads(p.read_text())["ranks"] for p in (one, two)] == [1, 2]
    r1, r2 = (json.loads(p.read_text())["results"] for p in (one, two))
    assert r1[1]["metrics"]["acc"]["value"] == evals[0][0]["eval/task/acc"]
    assert [r["name"] for r in r1] == ["text:text.txt", "task", "gf_mc", "gf_docs"] == [r["name"] for r in r2]
    # the harness's multiple-choice scoring of the same file (a chat checkpoint: through the template) == ours
    # example by example, but for one term: the harness's pair split moves the template's "\n" after
    # "assistant" into every choice's continuation, so its log-likelihoods differ from ours by log p("\n"),
    # the same for every choice of an example (acc is the same; ours scores the reply alone)
    ours, harness = r1[1]["per_example"], r1[2]["per_example"]
    assert sorted(int(i) for i in ours) == sorted(int(i) for i in harness) == list(range(7))
    for i, row in ours.items():
        offsets = [b[0] - a for a, b in zip(row["loglik"], harness[i])]
        assert max(offsets) - min(offsets) < 1e-4 and max(offsets) < 0, (i, row, harness[i])
    assert r1[2]["metrics"]["acc"] == r1[1]["metrics"]["acc"]
    for x, y in zip(r1, r2):
        assert x["examples"] == y["examples"] and x.get("per_example", {}).keys() == y.get("per_example", {}).keys()
        for k, v in x["metrics"].items():
            assert abs(v["value"] - y["metrics"][k]["value"]) < 1e-6 * max(1, abs(v["value"])), (k, x, y)
    shutil.rmtree(sft, ignore_errors=True)
