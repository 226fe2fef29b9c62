"""The whole pipeline with the gptforge CLI: data -> tokenizer -> pretrain -> SFT -> DPO -> chat.

    python examples/pipeline/run.py --lang en            # English: Shakespeare + ShareGPT
    python examples/pipeline/run.py --lang zh            # Chinese + English, BPE trained on both
    python examples/pipeline/run.py --lang zh --scale gpu  # the 26M minimind shape, longer (one GPU)

Every stage is one `gptforge` command, printed before it runs (copy them to run stages by hand). Stages
whose checkpoint already exists are skipped; --force redoes them. The last EVAL_PAIRS preference pairs are
kept out of DPO: they are the held-out evaluation (`gptforge eval` after every stage: bits per byte of their
real replies, and a two-choice task "which reply is the real one"). At the end, REPORT.md in the output
folder holds each stage's loss, its scores and a short chat transcript."""

from __future__ import annotations

import argparse
import json
import random
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# cpu: minutes on a laptop (a ~4M model); gpu: the minimind-small shape (~26M), still short on one GPU
SCALES = {
    "cpu": {"model": ["--model.preset=micro", "--model.block_size=256"], "micro_batch": 8,
            "pretrain_steps": 1000, "sft_epochs": 2, "dpo_epochs": 1, "precision": "bf16"},
    "gpu": {"model": ["--model.preset=minimind"], "micro_batch": 64,
            "pretrain_steps": 6000, "sft_epochs": 4, "dpo_epochs": 2, "precision": "auto"},
}
VOCAB = {"en": 4096, "zh": 6400}
EVAL_PAIRS = 100
PROMPTS = {
    "en": ["Hello! Who are you?", "Write a short poem about the sea.", "What is Python used for?"],
    "zh": ["《靜夜思》的作者是谁？", "背诵王之渙的《登鸛雀樓》。", "这条评论是正面还是负面？质量很好，非常满意",
           "Hello! Who are you?"],
}


def sh(cmd: list[str], log: Path | None = None) -> None:
    print("\n$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    if log is None:
        subprocess.run(cmd, check=True)
        return
    with open(log, "w") as f:  # tee: the terminal and a log file
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        for line in p.stdout:
            sys.stdout.write(line)
            f.write(line)
        if p.wait():
            raise SystemExit(f"stage failed (rc {p.returncode}); see {log}")


def stage_losses(run: Path) -> dict:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train/loss" in r]
    val = [r["val/loss"] for r in rows if "val/loss" in r]
    out = {"steps": train[-1]["step"], "first_loss": train[0]["train/loss"],
           "last_loss": sum(r["train/loss"] for r in train[-10:]) / len(train[-10:]),
           "val_loss": val[-1] if val else None}
    dpo = [r for r in train if "train/reward_margin" in r]
    if dpo:
        out["reward_margin"] = dpo[-1]["train/reward_margin"]
        out["reward_acc"] = sum(r["train/reward_acc"] for r in dpo[-10:]) / len(dpo[-10:])
    return out


def split_eval(data: Path, evdir: Path) -> None:
    """pairs.jsonl -> dpo_pairs.jsonl (DPO trains on these) and, from the last EVAL_PAIRS pairs, evdir/
    pref.jsonl (a gptforge task: the prompt, the real and the rejected reply in random order) and
    evdir/replies.txt (the real replies, for bits per byte)."""
    from data import write_jsonl

    pairs = [json.loads(x) for x in (data / "pairs.jsonl").read_text(encoding="utf-8").splitlines()]
    train, held = pairs[:-EVAL_PAIRS], pairs[-EVAL_PAIRS:]
    write_jsonl(data / "dpo_pairs.jsonl", train)
    evdir.mkdir(parents=True, exist_ok=True)
    rng, rows = random.Random(0), []
    for p in held:
        first = rng.random() < 0.5
        rows.append({"context": p["prompt"], "choices": [p["chosen"], p["rejected"]][::1 if first else -1],
                     "label": 0 if first else 1})
    write_jsonl(evdir / "pref.jsonl", rows)
    (evdir / "replies.txt").write_text("\n\n".join(p["chosen"] for p in held) + "\n", encoding="utf-8")


def stage_scores(path: Path) -> dict:
    res = {r["name"]: r["metrics"] for r in json.loads(path.read_text())["results"]}
    text = next(v for k, v in res.items() if k.startswith("text:"))
    return {"bits_per_byte": text["bits_per_byte"]["value"], "acc": res["pref"]["acc"]["value"],
            "acc_se": res["pref"]["acc"]["stderr"], "acc_norm": res["pref"]["acc_norm"]["value"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lang", choices=["en", "zh"], default="en")
    ap.add_argument("--scale", choices=list(SCALES), default="cpu")
    ap.add_argument("--out", default=None, help="output folder (default runs/pipeline_LANG)")
    ap.add_argument("--pretrain-steps", type=int, default=None)
    ap.add_argument("--force", action="store_true", help="redo stages that already have a checkpoint")
    a = ap.parse_args()
    sc = SCALES[a.scale]
    out = Path(a.out or f"runs/pipeline_{a.lang}")
    data, tokdir = out / "data", out / "tokenizer"
    gf = [sys.executable, "-m", "gptforge"]
    common = [f"--train.precision={sc['precision']}", "--train.progress=false", "--train.log_every=25"]
    t0 = time.time()

    if a.force or not (data / "pairs.jsonl").is_file():
        from data import build_chinese, build_english

        print(json.dumps((build_english if a.lang == "en" else build_chinese)(data)))
    evdir = out / "eval"
    if a.force or not (data / "dpo_pairs.jsonl").is_file():
        split_eval(data, evdir)
    evtask = f"--train.eval_tasks={evdir / 'pref.jsonl'}"  # the task's accuracy in the curves of SFT and DPO
    if a.force or not (tokdir / "tokenizer.json").is_file():
        sh([*gf, "train-tokenizer", "--input", str(data / "pretrain.jsonl"), "--vocab-size", str(VOCAB[a.lang]),
            "--out", str(tokdir)])

    def done(run: Path) -> bool:
        if a.force:  # a new run is refused in a folder holding another run's checkpoints: --force starts afresh
            shutil.rmtree(run, ignore_errors=True)
        return not a.force and (run / "checkpoints").is_dir() and any((run / "checkpoints").glob("step_*"))

    runs = {"pretrain": out / "pretrain", "sft": out / "sft", "dpo": out / "dpo"}
    steps = a.pretrain_steps or sc["pretrain_steps"]
    if not done(runs["pretrain"]):
        sh([*gf, "pretrain", *sc["model"], f"--data.path={data / 'pretrain.jsonl'}",
            f"--data.tokenizer={tokdir / 'tokenizer.json'}", "--data.val_fraction=0.005",
            f"--train.out_dir={runs['pretrain']}", f"--train.max_steps={steps}",
            f"--train.micro_batch={sc['micro_batch']}", "--train.lr=2e-3", "--train.warmup_steps=100",
            f"--train.eval_every={max(100, steps // 4)}", "--train.sample_tokens=0", *common],
           out / "pretrain.log")
    if not done(runs["sft"]):
        sh([*gf, "sft", f"--init-from={runs['pretrain']}", f"--data.path={data / 'sft.jsonl'}",
            f"--train.out_dir={runs['sft']}", f"--train.epochs={sc['sft_epochs']}",
            f"--train.micro_batch={sc['micro_batch']}", "--train.lr=1e-3", "--train.warmup_steps=50",
            "--data.val_fraction=0.02", "--train.eval_every=200", "--train.sample_prompt=" + PROMPTS[a.lang][0],
            evtask, *common], out / "sft.log")
    if not done(runs["dpo"]):
        sh([*gf, "dpo", f"--init-from={runs['sft']}", f"--data.path={data / 'dpo_pairs.jsonl'}",
            f"--train.out_dir={runs['dpo']}", f"--train.epochs={sc['dpo_epochs']}",
            f"--train.micro_batch={max(4, sc['micro_batch'] // 2)}", "--train.lr=1e-4", "--train.warmup_steps=10",
            "--dpo.beta=0.1", "--data.val_fraction=0.05", "--train.eval_every=100",
            "--train.sample_prompt=" + PROMPTS[a.lang][0], evtask, *common], out / "dpo.log")

    scores = {}
    for stage, run in runs.items():  # the same held-out evaluation after every stage
        res = evdir / f"{stage}.json"
        if a.force or not res.is_file():
            sh([*gf, "eval", "--checkpoint", str(run), "--tasks", str(evdir / "pref.jsonl"), "--text",
                str(evdir / "replies.txt"), "--text-tokens", "0", "--out", str(res)], out / f"eval_{stage}.log")
        scores[stage] = stage_scores(res)

    transcript = []
    for stage in ("sft", "dpo"):
        cmd = [*gf, "chat", "--checkpoint", str(runs[stage]), "--temperature", "0.7", "--top-k", "40",
               "--max-new-tokens", "120", "--seed", "0"]
        for p in PROMPTS[a.lang]:
            r = subprocess.run([*cmd, "--message", p], capture_output=True, text=True, check=True)
            transcript.append((stage, p, r.stdout.strip()))
    losses = {k: stage_losses(v) for k, v in runs.items()}
    lines = [f"# Worked example ({a.lang}, scale {a.scale})", "", f"Wall time: {(time.time() - t0) / 60:.1f} min "
             "(stages skipped when already done are not counted).", "", "| stage | steps | first loss | last loss "
             "(mean of 10) | val loss | DPO reward margin / acc |", "|---|---|---|---|---|---|"]
    for k, v in losses.items():
        val = f"{v['val_loss']:.3f}" if v["val_loss"] is not None else "-"
        extra = f"{v['reward_margin']:.3f} / {v['reward_acc']:.2f}" if "reward_margin" in v else ""
        lines.append(f"| {k} | {v['steps']} | {v['first_loss']:.3f} | {v['last_loss']:.3f} | {val} | {extra} |")
    lines += ["", f"## Held-out evaluation (`gptforge eval`, the {EVAL_PAIRS} pairs kept out of DPO)", "",
              "Pretrain is scored on plain text, SFT and DPO through the chat template. pref: which of two replies "
              "is the real one (chance 0.5).", "", "| stage | bits per byte (real replies) | pref acc ± stderr | "
              "pref acc_norm |", "|---|---|---|---|"]
    for k, v in scores.items():
        lines.append(f"| {k} | {v['bits_per_byte']:.3f} | {v['acc']:.2f} ± {v['acc_se']:.2f} | {v['acc_norm']:.2f} |")
    lines += ["", "## Chat (`gptforge chat --message`, temperature 0.7, top-k 40, seed 0)", ""]
    for stage, p, r in transcript:
        lines += [f"**[{stage}] user:** {p}", "", f"**assistant:** {r}", ""]
    (out / "REPORT.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n" + "\n".join(lines))
    print(f"\nchat with it: gptforge chat --checkpoint {runs['dpo']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
