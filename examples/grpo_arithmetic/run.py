"""Worked example: a small model taught addition by SFT, then by GRPO with an exact-match reward (a CPU, ~5 min).

    python examples/grpo_arithmetic/run.py                 # -> runs/grpo_arithmetic/REPORT.md
    python examples/grpo_arithmetic/run.py --force         # redo every stage

1. data: "a+b" questions (a, b < 100) with their sums, split into train.jsonl (SFT conversations), prompts.jsonl
   (the same questions as GRPO prompts with reference answers) and heldout.jsonl (questions never trained on).
2. `gptforge sft` from scratch (char tokenizer, a 2-layer 0.11M-parameter model), 800 steps: it answers about
   half of the held-out questions right.
3. held-out greedy exact-match accuracy of the SFT model: `gptforge eval --tasks heldout.jsonl --check exact`.
4. `gptforge grpo --init-from sft --data.path prompts.jsonl --grpo.reward=exact`: 1200 steps of 32 prompts x 8
   completions (temperature 1), constant lr 3e-4 after 20 warm-up steps, kl_coef 0.02.
5. held-out accuracy again (`gptforge eval`); REPORT.md holds both, the reward, KL and rollout speed over GRPO.
Each stage is one command, printed before it runs. One run on a CPU core (torch 2.13, ~5 min): held-out 56.8% after
SFT -> 76.8% after GRPO (+20.0 points); sampled reward 0.39 -> 0.74, KL to the SFT model 0.09-0.22."""

from __future__ import annotations

import argparse
import json
import random
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

MODEL = ["--model.preset=micro", "--model.n_layer=2", "--model.d_model=64", "--model.n_head=4",
         "--model.d_ff=256", "--model.block_size=48", "--model.arch=gpt2", "--model.qk_norm=false"]
COMMON = ["--train.precision=fp32", "--train.progress=false", "--train.tensorboard=false", "--train.eval_every=0",
          "--train.sample_tokens=0"]


def make_data(out: Path, n_heldout: int, seed: int = 0) -> None:
    r = random.Random(seed)
    pairs = [(a, b) for a in range(100) for b in range(100)]
    r.shuffle(pairs)
    held, train = pairs[:n_heldout], pairs[n_heldout:]

    def write(name, rows):
        (out / name).write_text("".join(json.dumps(x) + "\n" for x in rows))

    write("train.jsonl", [{"messages": [{"role": "user", "content": f"{a}+{b}"},
                                        {"role": "assistant", "content": str(a + b)}]} for a, b in train])
    write("prompts.jsonl", [{"prompt": f"{a}+{b}", "answer": str(a + b)} for a, b in train])
    write("heldout.jsonl", [{"prompt": f"{a}+{b}", "answer": str(a + b)} for a, b in held])


def sh(cmd: list[str], log: Path) -> None:
    """Run one stage, its output into `log`; its last lines (the summary) are shown."""
    print("\n$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    print("".join(log.read_text().splitlines(keepends=True)[-4:]), end="", flush=True)
    if rc:
        raise SystemExit(f"stage failed (rc {rc}); see {log}")


def heldout_command(run: Path, heldout: Path, out: Path) -> list[str]:
    """`gptforge eval` of the final checkpoint on the held-out questions: a generative task (prompt/answer lines),
    greedy completions judged by exact match (the reward grpo trains with; acc: the share right)."""
    return [sys.executable, "-m", "gptforge", "eval", "--checkpoint", str(run), "--tasks", str(heldout),
            "--check", "exact", "--max-new-tokens", "8", "--out", str(out), "--tensorboard=false"]


def heldout_accuracy(run: Path, heldout: Path, out: Path, log: Path) -> float:
    sh(heldout_command(run, heldout, out), log)
    return json.loads(out.read_text())["results"][0]["metrics"]["acc"]["value"]


def grpo_curve(run: Path, every: int = 10) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "train/reward" in r]
    out = []
    for a in range(0, len(rows), every):
        chunk = rows[a:a + every]
        out.append({k: sum(r[f"train/{k}"] for r in chunk) / len(chunk)
                    for k in ("reward", "accuracy", "kl", "completion_len", "rollout_tok_s")}
                   | {"steps": f"{chunk[0]['step']}-{chunk[-1]['step']}"})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/grpo_arithmetic")
    ap.add_argument("--sft-steps", type=int, default=800)
    ap.add_argument("--sft-lr", type=float, default=3e-3)
    ap.add_argument("--grpo-steps", type=int, default=1200)
    ap.add_argument("--grpo-lr", type=float, default=3e-4)
    ap.add_argument("--heldout", type=int, default=500)
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    if args.force and out.exists():
        shutil.rmtree(out)
    (out / "data").mkdir(parents=True, exist_ok=True)
    make_data(out / "data", args.heldout)
    gf = [sys.executable, "-m", "gptforge"]
    sft, grpo = out / "sft", out / "grpo"
    if not (sft / "checkpoints").exists():
        sh([*gf, "sft", *MODEL, *COMMON, f"--data.path={out / 'data/train.jsonl'}", "--data.val_fraction=0",
            f"--train.max_steps={args.sft_steps}", "--train.micro_batch=32", f"--train.lr={args.sft_lr}",
            "--train.warmup_steps=20", "--train.log_every=50", "--sft.packing=true", f"--train.out_dir={sft}"],
           out / "sft.log")
    before = heldout_accuracy(sft, out / "data/heldout.jsonl", out / "eval_sft.json", out / "eval_sft.log")
    print(f"held-out exact match after SFT: {before:.3f}", flush=True)
    if not (grpo / "checkpoints").exists():
        sh([*gf, "grpo", *COMMON, f"--init-from={sft}", f"--data.path={out / 'data/prompts.jsonl'}",
            f"--train.max_steps={args.grpo_steps}", "--train.micro_batch=32", f"--train.lr={args.grpo_lr}",
            "--train.schedule=constant", "--train.warmup_steps=20", "--train.log_every=5", "--train.save_every=100",
            "--grpo.group_size=8", "--grpo.max_new_tokens=5", "--grpo.kl_coef=0.02", "--grpo.temperature=1.0",
            "--grpo.reward=exact",
            f"--train.out_dir={grpo}"], out / "grpo.log")
    after = heldout_accuracy(grpo, out / "data/heldout.jsonl", out / "eval_grpo.json", out / "eval_grpo.log")
    print(f"held-out exact match after GRPO: {after:.3f}", flush=True)
    curve = grpo_curve(grpo, every=20)
    lines = ["# GRPO on additions", "", f"held-out ({args.heldout} questions, greedy, exact match): "
             f"SFT {before:.1%} -> GRPO {after:.1%} ({(after - before) * 100:+.1f} points)", "",
             "| steps | reward | accuracy (samples) | KL | completion tokens | rollout tok/s |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {c['steps']} | {c['reward']:.3f} | {c['accuracy']:.3f} | {c['kl']:.4f} | {c['completion_len']:.2f} "
              f"| {c['rollout_tok_s']:,.0f} |" for c in curve]
    (out / "REPORT.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
