"""`gptforge eval --checkpoint C --tasks T1,T2 --text FILE_OR_DATASET`: how good is a model.

    gptforge eval --checkpoint runs/pretrain --text data/val.txt              # perplexity, bits per byte
    gptforge eval --checkpoint runs/sft --tasks my_task.jsonl,hellaswag_val.jsonl
    gptforge eval --checkpoint runs/pretrain --tasks hellaswag,arc_easy --limit 500   # the LM Evaluation Harness
    gptforge eval --checkpoint runs/grpo --tasks heldout.jsonl --check exact --max-new-tokens 8   # generative
    gptforge launch --nproc-per-node 4 -- eval --checkpoint runs/pretrain --tasks arc_easy   # data-parallel

A task is a local JSONL file (gptforge.data.tasks: ours, HellaSwag's or ARC's own format; scored by the
log-likelihood of each choice, acc and acc_norm as the harness computes them; or generative, prompt/answer
records: the greedy completion judged by --check, acc and reward) or the name of a harness task
(gptforge.evaluate.harness, run on our model directly, no export). Chat checkpoints (with a chat template)
are evaluated through it (each context a user turn, each choice the reply) unless --chat false. Results:
one line per task and metric on screen, JSON in the run folder (eval/step_N.json; a Hugging Face folder:
runs/eval/NAME.json in the current directory, never in the folder) or --out, and
TensorBoard scalars eval/<task>/<metric> at the checkpoint's step.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from gptforge.errors import UserError
from gptforge.fileio import write_file_atomic


@dataclass
class EvalOptions:
    """Evaluate a checkpoint: perplexity / bits per byte, multiple-choice tasks, LM Evaluation Harness tasks."""

    checkpoint: str
    """a run folder (latest checkpoint), a checkpoint folder or a Hugging Face folder"""
    tasks: str = ""
    """comma list: local JSONL task files and/or LM Evaluation Harness task names"""
    text: str = ""
    """perplexity and bits per byte on this text: a file, folder, glob, hf:NAME or a prepared dataset dir (val)"""
    text_tokens: int = 1_000_000
    """at most this many tokens of --text (0: all)"""
    stride: int = 0
    """perplexity: new tokens per window (0: the whole context; smaller: more context per token, slower)"""
    limit: int = 0
    """examples per task (0: all)"""
    num_fewshot: int | None = None
    """harness tasks: few-shot examples (default: the task's own)"""
    include_path: str | None = None
    """harness tasks: a folder of task YAML files of your own"""
    check: str = "exact"
    """generative tasks ({"prompt", "answer"} lines): how a greedy completion is judged, as grpo.reward: exact
    (final answer after '####', else the last number), number (within --tolerance), regex (--format-regex
    matches), MODULE:FUNCTION; a comma list sums them; acc is the share with a reward >= 1"""
    tolerance: float = 1e-6
    """generative tasks, --check number: the absolute tolerance"""
    format_regex: str = ""
    """generative tasks, --check regex: the pattern (Python re.search over the completion)"""
    max_new_tokens: int = 64
    """generative tasks: the longest completion in tokens"""
    chat: Literal["auto", "true", "false"] = "auto"
    """score through the chat template (auto: when the checkpoint has one)"""
    batch_size: int = 16
    out: str | None = None
    """the JSON results (default: RUN/eval/step_N.json; for a Hugging Face folder runs/eval/FOLDER_NAME.json here,
    never inside the folder, which may come from elsewhere)"""
    tensorboard: bool = True
    """also write the results as TensorBoard scalars to RUN/tb (not for a Hugging Face folder)"""
    device: str = "auto"


def _where(checkpoint: str) -> tuple[Path | None, int]:
    """-> (run folder or None, checkpoint step)."""
    from gptforge.checkpoint import checkpoint_dir_of
    from gptforge.hf.load import is_hf_folder

    if is_hf_folder(checkpoint):
        return None, 0
    ck = checkpoint_dir_of(checkpoint)
    state = ck / "trainer_state.json"
    step = int(json.loads(state.read_text()).get("step", 0)) if state.is_file() else 0
    return (ck.parent.parent if ck.parent.name == "checkpoints" else ck.parent), step


def _out_path(opts: EvalOptions, run_dir: Path | None, step: int) -> Path:
    """--out, else the run folder's eval/step_N.json, else (a Hugging Face folder, an input that may come from
    elsewhere) runs/eval/NAME.json in the current directory, which must not be inside that folder."""
    if opts.out:
        return Path(opts.out)
    if run_dir is not None:
        return run_dir / "eval" / f"step_{step:07d}.json"
    folder = Path(opts.checkpoint).resolve()
    out = Path("runs", "eval", f"{folder.name}.json")
    if out.resolve().is_relative_to(folder):
        raise UserError(f"eval would write its results into the evaluated folder {opts.checkpoint}; run it from "
                        "another directory or choose the file with --out")
    return out


def check_options(o: EvalOptions) -> None:
    if not Path(o.checkpoint).exists():
        raise UserError(f"--checkpoint {o.checkpoint} does not exist (give a run folder, a checkpoint folder or an "
                        "exported Hugging Face folder)")
    if not o.tasks.strip() and not o.text.strip():
        raise UserError("nothing to evaluate: give --tasks T1,T2 (local .jsonl files or harness task names) "
                        "and/or --text FILE_OR_DATASET")
    for name, v in (("--batch-size", o.batch_size), ("--text-tokens", o.text_tokens + 1), ("--limit", o.limit + 1),
                    ("--stride", o.stride + 1), ("--max-new-tokens", o.max_new_tokens)):
        if v < 1:
            raise UserError(f"{name} must be {'>= 0' if name in ('--text-tokens', '--limit', '--stride') else '>= 1'}")


def _text_ids(spec: str, tok, max_tokens: int) -> tuple[list[int], int]:
    """-> (token ids, UTF-8 bytes of the text they encode) of --text, at most max_tokens (0: all)."""
    from gptforge.data.loader import open_tokens
    from gptforge.data.sources import iter_texts, resolve_inputs
    from gptforge.data.tokenizer import load_tokenizer

    docs, n = [""], 0
    if (Path(spec) / "meta.json").is_file():  # a prepared dataset: its validation split
        toks = open_tokens(spec, "val")
        toks = toks[:max_tokens] if max_tokens else toks
        docs = [load_tokenizer(spec).decode(toks.tolist())]
    else:
        for piece, ends in iter_texts(resolve_inputs(spec)):
            docs[-1] += piece
            n += len(piece)
            if max_tokens and n > 8 * max_tokens:  # enough text for max_tokens tokens of any tokenizer
                break
            if ends:
                docs.append("")
    docs = [d for d in docs if d]
    if not docs:
        raise UserError(f"--text {spec} holds no text")
    ids: list[int] = []
    for i, part in enumerate(tok.encode_batch(docs)):  # documents apart: the model's end token between them
        ids += ([tok.doc_end] if i else []) + part
    if max_tokens and len(ids) > max_tokens:
        ids = ids[:max_tokens]
        return ids, len(tok.decode([i for i in ids if i != tok.doc_end]).encode("utf-8"))
    return ids, sum(len(d.encode("utf-8")) for d in docs)


def perplexity(model, tok, spec: str, max_tokens: int, stride: int, env, batch_size: int) -> dict:
    """Rolling log-likelihood of --text after the model's start token (a folder's BOS, else its end token):
    every token of the text is predicted, and the end token between documents. Data-parallel:
    rank r scores windows r, r + world, ... and the sums are added over ranks."""
    import torch

    from gptforge.objectives.scoring import rolling_logprob

    ids, n_bytes = _text_ids(spec, tok, max_tokens)
    rank, world = (env.rank, env.world_size) if env.distributed else (0, 1)
    start = tok.bos_ids or [tok.doc_end]
    logp, count = rolling_logprob(model, [*start, *ids], stride or None, batch_size, rank, world)
    if env.distributed:
        import torch.distributed as dist

        t = torch.tensor([logp, float(count)], dtype=torch.float64, device=env.device)
        dist.all_reduce(t)
        logp, count = float(t[0]), int(t[1])
    nll = -logp / count
    return {"name": f"text:{Path(spec).name or spec}", "examples": count,
            "metrics": {"perplexity": (math.exp(nll), float("nan")), "loss": (nll, float("nan")),
                        "bits_per_byte": (-logp / math.log(2) / n_bytes, float("nan"))},
            "tokens": count, "bytes": n_bytes}


def format_table(results: list[dict]) -> str:
    rows = [("task", "metric", "value", "stderr", "examples")]
    for r in results:
        for m, (v, se) in r["metrics"].items():
            rows.append((r["name"], m, f"{v:.4f}", "" if se != se else f"{se:.4f}", str(r["examples"])))
    w = [max(len(row[i]) for row in rows) for i in range(5)]
    return "\n".join(f"{a:<{w[0]}}  {b:<{w[1]}}  {c:>{w[2]}}  {d:>{w[3]}}  {e:>{w[4]}}" for a, b, c, d, e in rows)


def evaluate(model, tok, opts: EvalOptions, chat: bool, env, chat_model: bool | None = None) -> list[dict]:
    """chat: score through the chat template; chat_model: the checkpoint has one (default: chat)."""
    from gptforge.data.tasks import is_task_file, load_task
    from gptforge.objectives.rewards import Check
    from gptforge.objectives.scoring import score_task

    names = [t.strip() for t in opts.tasks.split(",") if t.strip()]
    results = []
    if opts.text.strip():
        results.append(perplexity(model, tok, opts.text.strip(), opts.text_tokens, opts.stride, env, opts.batch_size))
    local = [t for t in names if is_task_file(t)]
    tasks = [load_task(path, opts.limit or None) for path in local]  # every file checked before any work
    check = Check(opts.check, opts.tolerance, opts.format_regex, opts.max_new_tokens)
    if any(t.generative for t in tasks):  # a wrong --check is one line before any work, in eval's own flags
        try:
            check.build()
        except UserError as e:
            raise UserError(str(e).replace("--grpo.format_regex", "--format-regex").replace(
                "grpo.format_regex", "--format-regex").replace("grpo.reward", "--check")) from None
    for task in tasks:
        results.append(score_task(model, tok, task, chat, env.rank, env.world_size, opts.batch_size, check))
    harness = [t for t in names if t not in local]
    if harness:
        from gptforge.evaluate.harness import run_harness

        out = run_harness(model, tok, harness, limit=opts.limit or None, num_fewshot=opts.num_fewshot,
                          batch_size=opts.batch_size, chat=chat, include_path=opts.include_path,
                          rank=env.rank, world=env.world_size, chat_model=chat_model)
        results += [{"name": name, "harness": True} | r for name, r in out.items()]
    return results


def _json_ready(results: list[dict]) -> list[dict]:
    def clean(v):
        return None if isinstance(v, float) and v != v else v

    return [{k: v for k, v in r.items() if k != "metrics"} |
            {"metrics": {m: {"value": clean(v), "stderr": clean(se)} for m, (v, se) in r["metrics"].items()}}
            for r in results]


def main(opts: EvalOptions) -> int:
    check_options(opts)
    from gptforge.config.schema import ParallelSection
    from gptforge.hf.inference import load_for_inference
    from gptforge.parallel.mesh import init_distributed, shutdown

    env = init_distributed(ParallelSection(), opts.device)
    try:
        model, tok, has_template = load_for_inference(opts.checkpoint, str(env.device))
        chat = has_template if opts.chat == "auto" else opts.chat == "true"
        run_dir, step = _where(opts.checkpoint)
        out = _out_path(opts, run_dir, step)  # before the work: a refused default costs nothing
        t0 = time.perf_counter()
        results = evaluate(model, tok, opts, chat, env, has_template)
        if env.is_main:
            print(f"eval: {opts.checkpoint} (step {step}{', chat template' if chat else ''}) in "
                  f"{time.perf_counter() - t0:.1f} s")
            print(format_table(results))
            out.parent.mkdir(parents=True, exist_ok=True)
            # the folder may come from elsewhere: a link planted at `out` is replaced, its target never written
            write_file_atomic(out, json.dumps({"checkpoint": str(opts.checkpoint), "step": step, "chat": chat,
                                               "ranks": env.world_size, "results": _json_ready(results)},
                                              indent=1) + "\n")
            print(f"eval: results in {out}")
            if opts.tensorboard and run_dir is not None:
                from torch.utils.tensorboard import SummaryWriter

                with SummaryWriter(str(run_dir / "tb")) as tb:
                    for r in results:
                        for m, (v, _) in r["metrics"].items():
                            tb.add_scalar(f"eval/{r['name']}/{m}", v, step)
        del model
    finally:
        shutdown(env)
    return 0
