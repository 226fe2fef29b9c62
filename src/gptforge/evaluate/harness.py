"""The LM Evaluation Harness (`lm-eval`) on a gptforge model directly, without exporting it.

`make_lm` builds an `lm_eval` model (a `TemplateLM`) over a loaded gptforge model: its log-likelihoods come from
gptforge.objectives.scoring (the same pair encoding and windows as the harness's `hf` backend, so the
numbers agree with `lm-eval --model hf` on the exported model), rolling log-likelihoods use the
harness's own window helpers, and generation goes through the one decode engine (model/engine.py).
Under `launch` (torchrun) every rank holds the whole model and the harness gives each rank its share of
the examples (rank, world_size, all_gather, gather_object, barrier over torch.distributed).

`run_harness(model, tok, ["hellaswag", "arc_easy"], ...)` runs harness tasks (by name, or your own task
YAML under include_path) and returns {task: {"examples", "metrics": {name: (value, stderr)}, ...}} on rank 0.
Harness tasks download their datasets from the Hugging Face hub on first use (into its cache); offline, a
task whose data is not cached is a one-line error.
"""

from __future__ import annotations

import logging
import math
import os

from gptforge.errors import UserError


def _lm_eval():
    try:
        from lm_eval.api.model import TemplateLM
    except ImportError:
        raise UserError("harness tasks need the LM Evaluation Harness: pip install 'gptforge[eval]' "
                        "(or give local .jsonl task files)") from None
    return TemplateLM


def make_lm(model, tok, batch_size: int = 16, rank: int = 0, world: int = 1, turn_end: bool = False):
    """-> an lm_eval LM over `model` (a plain gptforge GPT on this rank's device) and its tokenizer.
    turn_end: a chat model, whose generation also stops at <|im_end|> (as its export's generation_config says)."""
    TemplateLM = _lm_eval()
    import torch

    from gptforge.data.chat_template import CHATML_JINJA, render_chat
    from gptforge.data.chat_template import stop_ids as chat_stop_ids
    from gptforge.model.engine import Engine, Params
    from gptforge.objectives.scoring import loglikelihoods

    class GptforgeLM(TemplateLM):
        backend = "causal"

        def __init__(self):
            super().__init__()
            self.model, self.tok, self.batch_size = model, tok, batch_size
            self._rank, self._world_size = rank, world
            self._device = next(model.parameters()).device
            self.max_length = model.cfg.block_size
            self.stop_ids = chat_stop_ids(tok) if turn_end else set(tok.end_ids)
            self.engine = Engine(model, tok)

        @property
        def eot_token_id(self) -> int:
            return self.tok.doc_end

        @property
        def prefix_token_id(self) -> int:  # as the hf backend: the BOS when the tokenizer has one
            return self.tok.bos_ids[0] if self.tok.bos_ids else self.tok.doc_end

        @property
        def tokenizer_name(self) -> str:
            return "gptforge-chatml"

        def chat_template(self, chat_template=False) -> str:
            return self.tok.chat_template.text if self.tok.chat_template is not None else CHATML_JINJA

        def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
            if self.tok.chat_template is not None:  # a Hugging Face folder's own template (sandboxed)
                return self.tok.chat_template.render(chat_history, add_generation_prompt)
            return render_chat(chat_history, add_generation_prompt)

        def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
            return self.tok.encode(string)

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
            return loglikelihoods(self.model, [(ctx, cont) for _, ctx, cont in requests], self.batch_size)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

            windows, counts = [], []
            for (text,) in [r.args for r in requests]:
                w = [make_disjoint_window(x) for x in get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)]
                windows += w
                counts.append(len(w))
            lls = loglikelihoods(self.model, windows, self.batch_size) if windows else []
            out, k = [], 0
            for n in counts:
                out.append(sum(ll for ll, _ in lls[k:k + n]))
                k += n
            return out

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            out = []
            for context, kw in [r.args for r in requests]:
                kw = dict(kw or {})
                until = kw.pop("until", None) or []
                until = [until] if isinstance(until, str) else list(until)
                max_new = int(kw.pop("max_gen_toks", 256))
                sample = bool(kw.pop("do_sample", False))
                temperature = float(kw.pop("temperature", 1.0)) if sample else 0.0
                ids = self.tok_encode(context)[-max(1, self.max_length - max_new):]
                params = Params(max_new, temperature, None, kw.pop("top_p", None), 1234, frozenset(self.stop_ids),
                                tuple(until), skip_special=True)  # special tokens left out, as the hf backend
                text = self.engine.run(ids, params).text
                for u in until:
                    if u:
                        text = text.split(u)[0]
                out.append(text)
            return out

        # torch.distributed, for the harness's data-parallel evaluation (every rank must call these)
        def all_gather(self, tensor):
            if self._world_size == 1:
                return tensor
            import torch.distributed as dist

            parts = [torch.zeros_like(tensor) for _ in range(self._world_size)]
            dist.all_gather(parts, tensor)
            return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)

        def gather_object(self, obj, dst=0):
            if self._world_size == 1:
                return [obj]
            import torch.distributed as dist

            parts = [None] * self._world_size if self._rank == dst else None
            dist.gather_object(obj, parts, dst=dst)
            return parts

        def barrier(self) -> None:
            if self._world_size > 1:
                import torch.distributed as dist

                dist.barrier()

    return GptforgeLM()


def _metrics(row: dict) -> dict[str, tuple[float, float]]:
    """The harness's {"acc,none": v, "acc_stderr,none": se, "alias": ...} -> {"acc": (v, se)}."""
    out = {}
    for key, v in row.items():
        name, _, filt = key.partition(",")
        if not filt or "_stderr" in name or not isinstance(v, (int, float)):
            continue
        se = row.get(f"{name}_stderr,{filt}")
        label = name if filt == "none" else f"{name},{filt}"
        out[label] = (float(v), float(se) if isinstance(se, (int, float)) else float("nan"))
    return out


def run_harness(model, tok, names: list[str], limit: int | None = None, num_fewshot: int | None = None,
                batch_size: int = 16, chat: bool = False, include_path: str | None = None, rank: int = 0,
                world: int = 1, seed: int = 1234, chat_model: bool | None = None) -> dict[str, dict]:
    """Run harness tasks on `model`; every rank must call it. chat: render the tasks through the chat template;
    chat_model (default: chat): the checkpoint has one (generation stops at the end of a turn).
    -> on rank 0 {task: {"examples", "metrics": {metric: (value, stderr)}, "per_example": {doc_id: [response,
    ...]}}}; on other ranks {}."""
    lm = make_lm(model, tok, batch_size, rank, world, turn_end=chat if chat_model is None else chat_model)
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    for name in ("lm-eval", "lm_eval"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if include_path is not None and not os.path.isdir(include_path):
        raise UserError(f"--include-path {include_path} is not a folder of task YAML files")
    tm = TaskManager(include_path=include_path)
    unknown = [n for n in names if n not in tm.all_tasks]
    if unknown:
        raise UserError(f"unknown task {', '.join(unknown)}: not a local .jsonl file nor a harness task "
                        "(`lm-eval ls tasks` lists them; your own YAML goes in a folder given by --include-path)")
    try:
        res = simple_evaluate(model=lm, tasks=list(names), num_fewshot=num_fewshot, limit=limit,
                              task_manager=tm, apply_chat_template=chat, log_samples=True,
                              random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                              fewshot_random_seed=seed, verbosity="WARNING")
    except (ConnectionError, OSError, FileNotFoundError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"harness tasks {', '.join(names)}: their data could not be loaded ({first}); "
                        "run once with network access (the dataset is then cached) or use a local task") from None
    if res is None:  # not rank 0
        return {}
    out = {}
    for task, row in res["results"].items():
        n = res.get("n-samples", {}).get(task, {})
        samples = res.get("samples", {}).get(task, [])
        out[task] = {"examples": int(n.get("effective", len(samples))), "metrics": _metrics(row),
                     "per_example": {int(s["doc_id"]): [_plain(r) for r in s["filtered_resps"]]
                                     for s in samples}}
    return out


def _plain(r):
    """A response as JSON: (loglik, greedy) -> [loglik, greedy]; generated text as is."""
    if isinstance(r, (list, tuple)):
        return [_plain(x) for x in r]
    if isinstance(r, float) and not math.isfinite(r):
        return None
    return r
