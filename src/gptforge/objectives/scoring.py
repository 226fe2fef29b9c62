"""Log-likelihood scoring: the one home of "how likely is this text under the model", shared by
`gptforge eval` (built-in tasks and the lm-eval adapter) and evaluation during training.

- `encode_pair(tok, context, continuation)`: token ids of a (context, continuation) pair, split exactly
  as the LM Evaluation Harness splits them (trailing spaces of the context move to the continuation; the
  continuation's ids are those of the whole text after the context's), so our numbers match its.
- `loglikelihoods(model, pairs)`: for each (context ids, continuation ids) the summed log-probability of
  the continuation and whether greedy decoding would produce it (the harness's `is_greedy`); windows are
  cut on the left to the model's context, batched, padded on the right; a continuation longer than the
  context is scored in pieces of the context's length (as rolling windows).
- `rolling_logprob(model, ids)`: the log-probability of every token after the first of a long sequence
  (perplexity, bits per byte), in windows of the model's context with `stride` new tokens each.
- `choice_metrics(...)`: acc and acc_norm (by the choice's length in characters, as the harness does) of
  multiple-choice examples, and `mean_stderr` (the harness's standard error of a mean).
- `score_generation(...)`: generative tasks, the one home of held-out greedy accuracy (`gptforge eval`,
  train.eval_tasks, grpo's data.val_path): `greedy_rewards` decodes batches with the engine and judges each
  completion with objectives.rewards' checkers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def encode_pair(tok, context: str, continuation: str, prefix_id: int | None = None) -> tuple[list[int], list[int]]:
    """-> (context ids, continuation ids). An empty context becomes [prefix_id] (default: the model's start
    token, as the harness's hf backend: the BOS, else the end-of-text token)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation, context = context[-n_spaces:] + continuation, context[:-n_spaces]
    if not context:  # the model's start token: a BOS its tokenizer adds, else its end token
        start = getattr(tok, "bos_ids", None) or [getattr(tok, "doc_end", tok.eos_id)]
        prefix = start[0] if prefix_id is None else prefix_id
        return [prefix], tok.encode(continuation)
    whole, ctx = tok.encode(context + continuation), tok.encode(context)
    return ctx, whole[len(ctx):]


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def _block(model) -> int:
    """The model's context; `model` may be wrapped (DDP keeps the GPT in .module; FSDP2 wraps in place)."""
    return getattr(model, "module", model).cfg.block_size


def _windows(ids: Sequence[int], start: int, stride: int, block: int) -> list[tuple[list[int], list[int]]]:
    """-> [(input ids, target ids)] predicting ids[start:], `stride` (<= block) new tokens a window, each
    window seeing up to `block` tokens before its last target; the targets are the input's last positions'."""
    out = []
    for a in range(start, len(ids), stride):
        b = min(a + stride, len(ids))
        out.append((list(ids[max(0, b - 1 - block):b - 1]), list(ids[a:b])))
    return out


def _rows(pairs: Sequence[tuple[list[int], list[int]]], block: int) -> list[tuple[int, list[int], list[int]]]:
    """-> [(pair index, input ids, target ids)]: one row per pair, cut on the left to the model's context; a
    continuation longer than the context is scored in pieces of `block` tokens, each seeing the `block` tokens
    before its first target (as rolling windows do), and its pieces' log-probabilities add up."""
    rows = []
    for i, (ctx, cont) in enumerate(pairs):
        if not cont:
            raise ValueError(f"pair {i}: the continuation has no tokens")
        if not ctx:
            raise ValueError(f"pair {i}: the context has no tokens (give an end-of-text token)")
        rows += [(i, inp, tgt) for inp, tgt in _windows(list(ctx) + list(cont), len(ctx), block, block)]
    return rows


def count_forwards(pairs: Sequence[tuple[list[int], list[int]]], block: int, batch_size: int) -> int:
    """The forwards `loglikelihoods` runs for these pairs (ranks of a sharded model must agree on it)."""
    return -(-len(_rows(pairs, block)) // batch_size)


@torch.no_grad()
def _score(model, windows: Sequence[tuple[list[int], list[int]]], batch_size: int, min_batches: int,
           ) -> list[tuple[float, bool]]:
    """-> per window (sum log p(targets), every target the argmax), in the order given. Windows of similar
    length are batched together, padded on the right. min_batches: run at least this many forwards
    (one-token dummies after the real ones), so that ranks of a sharded model (FSDP, DDP's buffer
    broadcast) run the same number of collectives whatever their share."""
    dev = _device_of(model)
    out: list[tuple[float, bool]] = [(0.0, True)] * len(windows)
    order = sorted(range(len(windows)), key=lambda k: -len(windows[k][0]))  # similar lengths: less padding
    was_training = model.training
    model.eval()
    try:
        for b in range(0, len(order), batch_size):
            chunk = order[b:b + batch_size]
            x = torch.zeros(len(chunk), len(windows[chunk[0]][0]), dtype=torch.long)
            for j, k in enumerate(chunk):
                x[j, :len(windows[k][0])] = torch.tensor(windows[k][0])
            logp = F.log_softmax(model(x.to(dev)).float(), dim=-1)
            for j, k in enumerate(chunk):
                inp, tgt = windows[k]
                lp = logp[j, len(inp) - len(tgt):len(inp)]  # positions that predict the targets
                t = torch.tensor(tgt, device=lp.device)
                out[k] = (float(lp.gather(1, t[:, None]).sum()), bool((lp.argmax(-1) == t).all()))
        for _ in range(-(-len(order) // batch_size), min_batches):
            model(torch.zeros(1, 1, dtype=torch.long, device=dev))
    finally:
        model.train(was_training)
    return out


@torch.no_grad()
def loglikelihoods(model, pairs: Sequence[tuple[list[int], list[int]]], batch_size: int = 16,
                   min_batches: int = 0) -> list[tuple[float, bool]]:
    """-> [(sum log p(continuation | context), greedy)] in the order of `pairs`. min_batches: as `_score`'s."""
    rows = _rows(pairs, _block(model))
    scores = _score(model, [(inp, tgt) for _, inp, tgt in rows], batch_size, min_batches)
    out = [(0.0, True)] * len(pairs)
    for (i, _, _), (lp, greedy) in zip(rows, scores):
        out[i] = (out[i][0] + lp, out[i][1] and greedy)
    return out


@torch.no_grad()
def rolling_logprob(model, ids: Sequence[int], stride: int | None = None, batch_size: int = 8,
                    rank: int = 0, world: int = 1) -> tuple[float, int]:
    """-> (sum log p, tokens predicted) over ids[1:]. Each window predicts `stride` (default: the whole
    context) new tokens and sees up to the model's context of tokens before them. rank/world: this rank
    scores windows rank, rank + world, ... (the caller sums over ranks); every rank runs as many forwards."""
    block = _block(model)
    windows = _windows(ids, 1, min(stride or block, block), block)
    forwards = -(-(-(-len(windows) // world)) // batch_size)  # the same on every rank
    mine = windows[rank::world]
    scores = _score(model, mine, batch_size, forwards)
    return sum(lp for lp, _ in scores), sum(len(tgt) for _, tgt in mine)


def mean_stderr(values: Sequence[float]) -> float:
    """Standard error of the mean with the sample standard deviation (n - 1), as the harness reports it."""
    n = len(values)
    if n < 2:
        return float("nan")
    mu = sum(values) / n
    return math.sqrt(sum((v - mu) ** 2 for v in values) / (n - 1) / n)


def choice_metrics(scores: Sequence[Sequence[float]], choices: Sequence[Sequence[str]], labels: Sequence[int],
                   ) -> dict[str, list[float]]:
    """Per example: acc (the most likely choice is the label) and acc_norm (likelihood divided by the
    choice's length in characters). -> {"acc": [0/1, ...], "acc_norm": [...]}."""
    acc, acc_norm = [], []
    for s, ch, y in zip(scores, choices, labels):
        acc.append(float(max(range(len(s)), key=lambda k: s[k]) == y))
        acc_norm.append(float(max(range(len(s)), key=lambda k: s[k] / max(len(ch[k]), 1)) == y))
    return {"acc": acc, "acc_norm": acc_norm}


def task_pairs(tok, task, chat: bool = False, indices: Sequence[int] | None = None,
               ) -> list[list[tuple[list[int], list[int]]]]:
    """The (context ids, continuation ids) of every choice of the chosen examples of a data.tasks.Task.
    chat: the context is a user turn through the chat template and each choice the assistant's reply."""
    from gptforge.data.chat_template import encode_chat

    out = []
    for i in range(len(task.examples)) if indices is None else indices:
        ex = task.examples[i]
        if chat:
            ctx = encode_chat(tok, [{"role": "user", "content": ex.context}], add_generation_prompt=True)[0]
            out.append([(ctx, tok.encode(c)) for c in ex.choices])
        else:
            out.append([encode_pair(tok, ex.context, task.delimiter + c) for c in ex.choices])
    return out


def score_task(model, tok, task, chat: bool = False, rank: int = 0, world: int = 1, batch_size: int = 16,
               check=None) -> dict:
    """Score a data.tasks.Task, data-parallel: this rank takes the examples i with i % world == rank, and with
    world > 1 the results of every rank are gathered over torch.distributed's default group (every rank of
    it must call this; ranks that hold the same share, e.g. tensor-parallel peers, are counted once).
    -> {"name", "examples", "metrics": {"acc": (mean, stderr), "acc_norm": ...},
        "per_example": {i: {"loglik": [per choice], "acc", "acc_norm"}}}.
    A generative task goes to score_generation, judged by check (objectives.rewards.Check; None: exact match)."""
    if task.generative:
        from gptforge.objectives.rewards import Check

        return score_generation(model, tok, task, check or Check(), chat, rank, world, batch_size)
    idx = list(range(rank, len(task.examples), world))
    per_example = task_pairs(tok, task, chat, idx)
    flat_pairs = [p for pairs in per_example for p in pairs]
    min_batches = 0
    if world > 1:
        import torch.distributed as dist

        n = torch.tensor([count_forwards(flat_pairs, _block(model), batch_size)], device=_device_of(model))
        dist.all_reduce(n, op=dist.ReduceOp.MAX)
        min_batches = int(n)
    flat = loglikelihoods(model, flat_pairs, batch_size, min_batches)
    scores, k = [], 0
    for pairs in per_example:
        scores.append([ll for ll, _ in flat[k:k + len(pairs)]])
        k += len(pairs)
    ex = [task.examples[i] for i in idx]
    m = choice_metrics(scores, [e.choices for e in ex], [e.label for e in ex])
    rows = {i: {"loglik": s, "acc": a, "acc_norm": b} for i, s, a, b in zip(idx, scores, m["acc"], m["acc_norm"])}
    return _task_result(task, rows, ("acc", "acc_norm"), world)


def _task_result(task, rows: dict[int, dict], names: Sequence[str], world: int) -> dict:
    """This rank's per-example rows gathered from every rank (world > 1) -> score_task's result."""
    if world > 1:
        import torch.distributed as dist

        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, rows)
        rows = {i: r for part in parts for i, r in part.items()}
    rows = dict(sorted(rows.items()))
    metrics = {k: (sum(r[k] for r in rows.values()) / len(rows), mean_stderr([r[k] for r in rows.values()]))
               for k in names}
    return {"name": task.name, "examples": len(rows), "metrics": metrics, "per_example": rows}


# ---- generative tasks: a greedy completion judged by a reward checker (objectives.rewards) ------------------
def generation_prompts(tok, texts: Sequence[str], chat: bool, block: int, max_new_tokens: int) -> list[list[int]]:
    """The prompt ids: a user turn through the chat template (generation prompt added) or the text as
    `generate` encodes it (with a tokenizer's BOS); a prompt that leaves less than max_new_tokens of the context
    is cut on the left (as the LM Evaluation Harness's generate_until), keeping at least one token."""
    from gptforge.data.chat_template import encode_chat

    keep = max(1, block - max_new_tokens)
    out = []
    for text in texts:
        ids = encode_chat(tok, [{"role": "user", "content": text}], add_generation_prompt=True)[0] if chat \
            else tok.encode_prompt(text)
        out.append(ids[-keep:])
    return out


def completion_stops(tok, chat: bool) -> frozenset:
    """Where a completion ends: the end of a turn for a chat model, else the model's end tokens."""
    from gptforge.data.chat_template import stop_ids

    return frozenset(stop_ids(tok) if chat else getattr(tok, "end_ids", None) or {tok.eos_id})


@torch.no_grad()
def greedy_rewards(model, tok, prompts: Sequence[list[int]], answers: Sequence[str], reward_fn, max_new_tokens: int,
                   stops: frozenset, batch_size: int = 16) -> list[tuple[str, float]]:
    """-> (the greedy completion, its reward) of each prompt: batches of batch_size decoded together by the
    engine (model.engine; a DDP-wrapped model's .module: no collectives). The completion's text leaves the stop
    tokens out, as GRPO's rollouts do."""
    from gptforge.model.engine import Engine, Params

    plain = getattr(model, "module", model)
    out = []
    for a in range(0, len(prompts), batch_size):
        ps = [list(p) for p in prompts[a:a + batch_size]]
        params = [Params(max_new_tokens, 0.0, stop_ids=stops) for _ in ps]
        for r, ans in zip(Engine(plain, tok, slots=len(ps)).run_batch(ps, params), answers[a:a + batch_size]):
            text = tok.decode([t for t in r.ids if t not in stops])
            out.append((text, float(reward_fn(text, ans))))
    return out


def score_generation(model, tok, task, check, chat: bool = False, rank: int = 0, world: int = 1,
                     batch_size: int = 16) -> dict:
    """A generative data.tasks.Task, data-parallel as score_task (every rank holds the whole model): each
    prompt's greedy completion judged by `check` (objectives.rewards.Check). -> {"name", "examples", "metrics":
    {"acc": share with a reward >= 1 (exact match with the exact check), "reward": mean reward}, "per_example":
    {i: {"completion", "reward", "acc"}}}."""
    from gptforge.objectives.rewards import score

    idx = list(range(rank, len(task.examples), world))
    ex = [task.examples[i] for i in idx]
    prompts = generation_prompts(tok, [e.prompt for e in ex], chat, _block(model), check.max_new_tokens)
    fn = check.build()
    got = greedy_rewards(model, tok, prompts, [e.answer for e in ex],
                         lambda c, a: score(fn, c, a, check.reward), check.max_new_tokens,
                         completion_stops(tok, chat), batch_size)
    rows = {i: {"completion": text, "reward": r, "acc": float(r >= 1)} for i, (text, r) in zip(idx, got)}
    return _task_result(task, rows, ("acc", "reward"), world)
