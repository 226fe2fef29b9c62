"""Group relative policy optimisation (GRPO; Shao et al. 2024, DeepSeekMath) with verifiable rewards.

For each prompt, G completions are sampled by the serving engine (model.engine.Engine.run_batch: batched,
KV cache, one seeded generator per completion) and scored (objectives.rewards). Per completion i of a group:

    A_i      = (r_i - mean(r)) / (std(r) + eps)                    (std with n - 1, as TRL; 0 for a flat group)
    ratio_t  = exp(log pi(y_t) - log pi_old(y_t))                  (pi_old: the policy that sampled, its log-probs
                                                                    recorded while decoding)
    pg_t     = -min(ratio_t * A_i, clip(ratio_t, 1 - clip_eps, 1 + clip_eps) * A_i)
    kl_t     = exp(ref_t - logp_t) - (ref_t - logp_t) - 1          (the k3 estimator, >= 0; ref: the frozen start)
    loss     = mean over completions of [ mean over its tokens of (pg_t + kl_coef * kl_t) ]

Only completion tokens count (the prompt and the padding are masked out); a completion's final stop token
counts (the policy learns to stop). Every log-prob is taken at the rollouts' temperature T, as TRL does:
log softmax(logits / T) for the policy in the loss, for the reference of the KL term, and for pi_old, which the
engine records while sampling from that very distribution (model.engine.Params.logprobs); so ratio and KL
compare the distributions the completions were drawn from. One optimizer step per rollout batch, so ratio
starts at 1 (up to the rounding of cached vs full forwards) and the clip bounds that step's move.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gptforge.model.engine import Engine, Params
from gptforge.model.sampling import GREEDY_BELOW
from gptforge.objectives.head import head_loss, token_loss
from gptforge.objectives.rewards import RewardFn, score


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """rewards (P, G) -> advantages (P, G): each group centred on its mean and divided by its std + eps."""
    mean = rewards.mean(-1, keepdim=True)
    std = rewards.std(-1, keepdim=True) if rewards.shape[-1] > 1 else torch.zeros_like(mean)
    return (rewards - mean) / (std + eps)


def kl_k3(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi || ref) estimate exp(ref - logp) - (ref - logp) - 1 (Schulman's k3; >= 0)."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1


def grpo_loss(logps, old_logps, ref_logps, advantages, mask, clip_eps: float, kl_coef: float):
    """Per-token tensors (N, T), advantages (N,), mask (N, T) of the completion tokens ->
    (loss, {"kl": mean per-token KL, "clip_frac": share of tokens whose ratio was clipped})."""
    mask = mask.to(logps.dtype)
    ratio = torch.exp(logps - old_logps)
    a = advantages[:, None].to(logps.dtype)
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)
    pg = -torch.minimum(ratio * a, clipped * a)
    kl = kl_k3(logps, ref_logps)
    per_token = pg + kl_coef * kl if kl_coef else pg
    n = mask.sum(-1).clamp(min=1)
    loss = ((per_token * mask).sum(-1) / n).mean()
    total = mask.sum().clamp(min=1)
    # clipped: the min took the clipped side, so the token passes no policy gradient
    cut = ((ratio > 1 + clip_eps) & (a > 0)) | ((ratio < 1 - clip_eps) & (a < 0))
    stats = {"kl": ((kl * mask).sum() / total).detach(),
             "clip_frac": ((cut.to(mask.dtype) * mask).sum() / total).detach()}
    return loss, stats


@dataclass
class Rollout:
    """G completions of each of P prompts, row p * G + g, as a training batch: input_ids (N, T) prompt +
    completion but the last token, right-padded; labels (N, T): the next token at completion positions, -100
    elsewhere; old_logps (N, T) float64: the sampler's log-probs at the same positions (0 elsewhere)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    old_logps: torch.Tensor
    completions: list[list[int]]
    texts: list[str]
    seconds: float

    @property
    def mask(self) -> torch.Tensor:
        return self.labels != -100


@torch.no_grad()
def rollout(model, tok, prompts: list[list[int]], seeds: list[int], group_size: int, max_new_tokens: int,
            temperature: float, stop_ids: frozenset, pad_id: int = 0) -> Rollout:
    """Sample group_size completions of each prompt with the engine; completion g of a prompt with seed s
    samples with seed s * group_size + g, so a seed gives the same completions whatever else is in the batch."""
    t0 = time.perf_counter()
    n = len(prompts) * group_size
    ps = [prompts[i // group_size] for i in range(n)]
    params = [Params(max_new_tokens, temperature, None, None, int(seeds[i // group_size]) * group_size
                     + i % group_size, stop_ids, logprobs=True) for i in range(n)]
    results = Engine(model, tok, slots=n).run_batch(ps, params)
    T = max(len(p) + len(r.ids) for p, r in zip(ps, results)) - 1
    ids = torch.full((n, T), pad_id, dtype=torch.long)
    labels = torch.full((n, T), -100, dtype=torch.long)
    old = torch.zeros(n, T, dtype=torch.float64)
    for i, (p, r) in enumerate(zip(ps, results)):
        seq = p + r.ids
        ids[i, :len(seq) - 1] = torch.tensor(seq[:-1])
        a, b = len(p) - 1, len(seq) - 1  # positions that predict the completion's tokens
        labels[i, a:b] = torch.tensor(r.ids)
        old[i, a:b] = torch.tensor(r.logprobs, dtype=torch.float64)
    texts = [tok.decode([t for t in r.ids if t not in stop_ids]) for r in results]
    return Rollout(ids, labels, old, [r.ids for r in results], texts, time.perf_counter() - t0)


def token_logps(model, input_ids, labels, loss_impl: str = "plain", temperature: float = 1.0) -> torch.Tensor:
    """log p(label) at each position (0 where the label is -100) under softmax(logits / temperature) -> (N, T)
    float32. lm_head has no bias, so dividing the head's input by T divides the logits (the head never holds all
    of them); a soft-capped model's logits are capped before the division, so it takes the full logits."""
    batch = {"input_ids": input_ids, "labels": labels}
    if temperature == 1.0:
        return -token_loss(model, batch, loss_impl, "none")
    if loss_impl == "plain" or getattr(model, "module", model).cfg.logit_softcap:
        logits = model(input_ids)
        logits = (logits if logits.dtype == torch.float64 else logits.float()) / temperature
        return -F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100,
                                reduction="none").view(labels.shape)
    head = head_loss(loss_impl, labels, "none")
    return -model(input_ids, head=lambda h, w, **kw: head(h / temperature, w, **kw))


class GRPOObjective:
    """Called by the Trainer with a batch of prompt indices ("idx") and their seeds ("seed"): samples the groups
    with the plain model, scores them, and returns the GRPO loss of the (possibly DDP-wrapped) model."""

    name = "grpo"
    # for the Trainer: rows are prompt + completion, not block_size windows, so each micro-batch's metrics hold
    # "tokens" (its prompt + completion tokens, padding left out): the log line's tok/s counts those (no MFU);
    # and a policy-gradient loss sits near 0 and changes sign, so no loss-spike warning (train.spike_factor)
    counts_tokens = True
    spike_check = False

    def __init__(self, tok, prompts: list[list[int]], answers: list[str], reward_fn: RewardFn, reward_spec: str,
                 ref_model, group_size: int, max_new_tokens: int, temperature: float, kl_coef: float,
                 clip_eps: float, stop_ids: frozenset, loss_impl: str = "plain"):
        self.tok, self.prompts, self.answers, self.ref_model = tok, prompts, answers, ref_model
        self.reward_fn, self.reward_spec = reward_fn, reward_spec
        self.G, self.max_new, self.temperature = group_size, max_new_tokens, temperature
        self.kl_coef, self.clip_eps, self.stop_ids, self.loss_impl = kl_coef, clip_eps, stop_ids, loss_impl
        self.pad_id = tok.pad_id if getattr(tok, "pad_id", None) is not None else 0

    def full_tokens_per_row(self) -> float:
        """A prompt's tokens for a step if each of its G completions ran to max_new_tokens (the prompts' mean
        length): the Trainer lays out train.max_tokens's LR schedule with it; the run stops on the real count."""
        return self.G * (sum(map(len, self.prompts)) / len(self.prompts) + self.max_new)

    def rewards(self, idx: list[int], texts: list[str]) -> torch.Tensor:
        r = [score(self.reward_fn, texts[i], self.answers[idx[i // self.G]], self.reward_spec)
             for i in range(len(texts))]
        return torch.tensor(r, dtype=torch.float64).view(len(idx), self.G)

    def __call__(self, model, batch: dict):
        idx, seeds = batch["idx"].tolist(), batch["seed"].tolist()
        plain = getattr(model, "module", model)  # DDP keeps the GPT in .module: sampling runs no collectives
        ro = rollout(plain, self.tok, [self.prompts[i] for i in idx], seeds, self.G, self.max_new,
                     self.temperature, self.stop_ids, self.pad_id)
        rewards = self.rewards(idx, ro.texts)
        adv = group_advantages(rewards).view(-1)
        device = next(plain.parameters()).device
        x, y, mask = ro.input_ids.to(device), ro.labels.to(device), ro.mask.to(device)
        t = self.temperature if self.temperature >= GREEDY_BELOW else 1.0  # as the engine's recorded log-probs
        with torch.no_grad():
            ref = token_logps(self.ref_model, x, y, self.loss_impl, t) if self.kl_coef else None
        logps = token_logps(model, x, y, self.loss_impl, t)
        ref = logps.detach() if ref is None else ref
        loss, stats = grpo_loss(logps, ro.old_logps.to(device, logps.dtype), ref, adv.to(device), mask,
                                self.clip_eps, self.kl_coef)
        n_tokens = float(mask.sum())
        n_prompt = sum(len(self.prompts[i]) for i in idx) * self.G
        metrics = {"reward": rewards.mean(), "accuracy": (rewards >= 1).double().mean(),
                   "tokens": torch.tensor(n_prompt + n_tokens),
                   "completion_len": torch.tensor(n_tokens / len(ro.texts)),
                   "rollout_tok_s": torch.tensor(n_tokens / max(ro.seconds, 1e-9))} | stats
        return loss, {k: v.float().to(device) for k, v in metrics.items()}
