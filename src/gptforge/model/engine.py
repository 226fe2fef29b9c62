"""The one decode engine: every caller that samples text goes through it (`gptforge generate` and `chat`,
the text sample at the end of a training run, `eval`'s generation tasks, and `gptforge serve`, whose
scheduler thread (serve/engine.py) drives the same steps for many sequences at once).

Sampling (model.sampling.sample_next), stop tokens, stop strings, streaming text and the KV cache
(model.kv_cache.SlotCache) are here once, so a given seed gives the same text in every command.
`Engine.run(prompt_ids, params, on_text)` decodes one sequence in the caller's thread:

    r = Engine(model, tok).run(tok.encode("ROMEO:"), Params(max_tokens=40, temperature=0.8, seed=1))
    r.text, r.finish_reason, r.ids      # "stop" (a stop id or string) or "length" (max_tokens or the context)
    Engine(model, tok, slots=N).run_batch(prompts, params)   # N sequences decoded together (GRPO's rollouts);
                                        # Params(logprobs=True): r.logprobs, log p of each sampled token

Every sequence has its own row (slot) of the cache, with its own length; a step feeds one token per row at
that row's position. Each sequence samples with its own torch.Generator (seeded when Params.seed is given),
so its text does not depend on what else runs in the batch. Plain PyTorch and plain Python: no threads here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch

from gptforge.model.kv_cache import SlotCache
from gptforge.model.sampling import GREEDY_BELOW, check_prompt, sample_next


@dataclass
class Params:
    """How one sequence is sampled and when it ends."""

    max_tokens: int
    temperature: float = 1.0  # below model.sampling.GREEDY_BELOW (0 included): greedy
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None  # None: a fresh random stream
    stop_ids: frozenset = frozenset()  # ending tokens (counted in n_new, never in the text)
    stop: tuple[str, ...] = ()  # stop strings: the text is cut before the first one
    skip_special: bool = False  # leave special tokens out of the text (the eval harness, as HF's decode)
    logprobs: bool = False  # record log p(token) of each sampled token in Sequence.logprobs: under the
    # distribution it was sampled from before top-k/top-p, softmax(logits / temperature) (temperature 1 when
    # greedy): what GRPO's ratio compares with, its policy log-probs taken at the same temperature


class StreamDecoder:
    """Turns a stream of ids into text pieces; holds back bytes of an unfinished UTF-8 character."""

    def __init__(self, tokenizer, skip_special: bool = False):
        self.tok, self.ids, self.emitted = tokenizer, [], ""
        self.kw = {"skip_special": True} if skip_special else {}

    def push(self, tid: int) -> str:
        self.ids.append(tid)
        text = self.tok.decode(self.ids, **self.kw)
        if text.endswith("\ufffd"):
            return ""
        piece, self.emitted = text[len(self.emitted):], text
        return piece


def _borders(s: str) -> list[int]:
    """Knuth-Morris-Pratt's table: b[k] is the length of the longest proper prefix of s[:k] that also ends it."""
    b, k = [0] * (len(s) + 1), 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = b[k]
        if s[i] == s[k]:
            k += 1
        b[i + 1] = k
    return b


class StopMatcher:
    """Cuts the text at the first stop string; holds back the tail that could still become one.

    Linear in the text, whatever the stop strings' lengths: each stop follows the text with a KMP automaton
    (its state: the longest prefix of the stop that ends the text so far), so a piece costs O(len(piece))
    steps per stop, amortized, and the tail held back is at most the longest stop. When stops complete in the
    same piece, the text is cut before the one that starts first. `examined` counts the steps (for tests)."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(dict.fromkeys(s for s in stops if s))
        self.borders = [_borders(s) for s in self.stops]
        self.state = [0] * len(self.stops)
        self.pending, self.hit, self.examined = "", False, 0

    def push(self, piece: str) -> str:
        text, cut = self.pending + piece, self._scan(piece, len(self.pending))
        if cut is not None:
            self.hit, self.pending = True, ""
            return text[:cut]
        hold = max(self.state, default=0)
        self.pending = text[len(text) - hold:] if hold else ""
        return text[:len(text) - hold]

    def _scan(self, piece: str, base: int) -> int | None:
        """Feed `piece` (starting at `base` in pending + piece) to every automaton; the earliest start of a
        stop that completes in it, or None."""
        cut = None
        for j, (s, b) in enumerate(zip(self.stops, self.borders)):
            q, steps = self.state[j], 0
            for i, c in enumerate(piece):
                while q and c != s[q]:
                    q, steps = b[q], steps + 1
                q += c == s[q]
                steps += 1
                if q == len(s):
                    start = base + i + 1 - q
                    cut = start if cut is None else min(cut, start)
                    break
            self.state[j] = q
            self.examined += steps
        return cut

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


@dataclass
class Sequence:
    """One request. `emit(kind, value)` is called from the thread that steps the engine: ("text", str) per
    piece, then ("done", finish_reason) once (finish_reason: "stop", "length", "cancelled" or "error: ...")."""

    prompt: list[int]
    params: Params
    emit: Callable[[str, object], None]
    ids: list[int] = field(default_factory=list)  # every sampled token, a final stop id included
    logprobs: list[float] = field(default_factory=list)  # Params.logprobs: log p of each of ids
    finish_reason: str | None = None
    slot: int = -1
    cancelled: bool = False
    gen: torch.Generator = field(init=False)

    def __post_init__(self):
        self.gen = torch.Generator()
        if self.params.seed is None:
            self.gen.seed()
        else:
            self.gen.manual_seed(self.params.seed)

    @property
    def n_new(self) -> int:
        return len(self.ids)

    def cancel(self) -> None:
        self.cancelled = True


class Result(NamedTuple):
    text: str
    finish_reason: str
    n_new: int
    ids: list[int]
    logprobs: list[float] = []  # Params.logprobs: log p of each of ids


class Engine:
    """Decodes sequences of `model` (a plain GPT) in `slots` rows of one SlotCache. `tok` None: ids only (no
    text, no stop strings). use_cache=False recomputes the whole sequence at every step (`gptforge generate
    --no-cache`; run() only)."""

    def __init__(self, model, tok, slots: int = 1, use_cache: bool = True):
        self.model, self.tok = model, tok
        self.block = model.cfg.block_size
        self.use_cache = use_cache
        self._cache = SlotCache(model, slots)
        self._decoders: dict[int, tuple[StreamDecoder, StopMatcher]] = {}

    def check(self, prompt_ids: list[int]) -> None:
        """The prompt fits the context (one line naming both lengths)."""
        check_prompt(len(prompt_ids), self.block)

    # ---- the steps (run() below; serve's scheduler calls them for many sequences) ----------------------------
    def _begin(self, s: Sequence, slot: int) -> None:
        """Prefill s into `slot` and sample its first token."""
        self._assign(s, slot)
        self._forward([s], [s.prompt])

    def _assign(self, s: Sequence, slot: int) -> None:
        s.slot = slot
        self._decoders[id(s)] = (StreamDecoder(self.tok, s.params.skip_special), StopMatcher(s.params.stop))

    def _decode(self, seqs: list[Sequence]) -> None:
        """One decode step: the last token of each sequence in, the next one sampled."""
        self._forward(seqs, [[s.ids[-1]] for s in seqs])

    @torch.no_grad()
    def _forward(self, seqs: list[Sequence], tokens: list[list[int]]) -> None:
        cache = self._cache
        pos, mask = cache.select([s.slot for s in seqs], len(tokens[0]))
        x = torch.tensor(tokens, dtype=torch.long, device=cache.device)
        logits = self.model(x, kv_cache=cache, attn_mask=mask, positions=pos)[:, -1, :]
        for i, s in enumerate(seqs):
            p = s.params
            s.ids.append(int(sample_next(logits[i:i + 1], p.temperature, p.top_k, p.top_p, s.gen).item()))
            if p.logprobs:
                t = p.temperature if p.temperature >= GREEDY_BELOW else 1.0
                s.logprobs.append(float((logits[i].float() / t).log_softmax(-1)[s.ids[-1]]))
            self._take(s)

    def _take(self, s: Sequence) -> None:
        """Handle the token just sampled for s: stop id, text, stop string, max_tokens, context end."""
        dec, matcher = self._decoders[id(s)]
        last = s.ids[-1]  # a stop token counts (usage.completion_tokens), as in OpenAI's and vLLM's usage
        if last in s.params.stop_ids:
            return self._release(s, "stop")
        piece = dec.push(last) if self.tok is not None else ""
        if piece:
            out = matcher.push(piece)
            if out:
                s.emit("text", out)
            if matcher.hit:
                return self._release(s, "stop")
        if s.n_new >= min(s.params.max_tokens, self.block - len(s.prompt)):
            self._release(s, "length")

    def _release(self, s: Sequence, reason: str) -> None:
        """The one way a sequence ends: the text held back for a possible stop string goes out (when it ended
        normally and no stop string cut it), its slot is freed, ("done", reason) is told once."""
        if s.finish_reason is not None:
            return
        _, matcher = self._decoders.pop(id(s), (None, None))
        if matcher is not None and reason in ("stop", "length") and not matcher.hit:
            tail = matcher.flush()
            if tail:
                s.emit("text", tail)
        s.finish_reason = reason
        if s.slot >= 0:
            self._cache.free(s.slot)
        s.emit("done", reason)

    # ---- one sequence in the caller's thread ----------------------------------------------------------------
    def run(self, prompt_ids: list[int], params: Params, on_text: Callable[[str], None] | None = None) -> Result:
        """Decode one sequence (the model in eval mode meanwhile); on_text gets each text piece as it comes.
        Ctrl-C (KeyboardInterrupt) ends it, the text so far emitted, the slot freed."""
        self.check(prompt_ids)
        pieces: list[str] = []

        def emit(kind, value):
            if kind == "text":
                pieces.append(value)
                if on_text:
                    on_text(value)

        s = Sequence(list(prompt_ids), params, emit)
        was_training = self.model.training
        self.model.eval()
        try:
            self._begin(s, 0)
            while s.finish_reason is None:
                if self.use_cache:
                    self._decode([s])
                else:  # recompute: the row emptied, the whole sequence fed again
                    self._cache.free(0)
                    self._forward([s], [s.prompt + s.ids])
        finally:
            self._release(s, "cancelled")  # a no-op when it ended normally
            self.model.train(was_training)
        return Result("".join(pieces), s.finish_reason, s.n_new, s.ids, s.logprobs)

    def run_batch(self, prompts: list[list[int]], params: list[Params]) -> list[Result]:
        """Decode len(prompts) sequences together (the Engine needs that many slots): prompts of one length
        prefilled together, each in its own row, then one batched decode step for all unfinished rows at a time. Each sequence samples with its own
        generator, so with seeds its tokens are those run() gives it alone (up to the float rounding of batched
        matmuls). The model is in eval mode meanwhile."""
        if len(prompts) > len(self._cache.lengths):
            raise ValueError(f"{len(prompts)} sequences but the engine has {len(self._cache.lengths)} slots")
        for p in prompts:
            self.check(p)
        texts: list[list[str]] = [[] for _ in prompts]
        seqs = [Sequence(list(p), q, lambda kind, v, out=out: out.append(v) if kind == "text" else None)
                for p, q, out in zip(prompts, params, texts)]
        was_training = self.model.training
        self.model.eval()
        try:
            by_length: dict[int, list[Sequence]] = {}  # prompts of one length prefill in one forward
            for slot, s in enumerate(seqs):
                self._assign(s, slot)
                by_length.setdefault(len(s.prompt), []).append(s)
            for group in by_length.values():
                self._forward(group, [s.prompt for s in group])
            while live := [s for s in seqs if s.finish_reason is None]:
                self._decode(live)
        finally:
            for s in seqs:
                self._release(s, "cancelled")
            self.model.train(was_training)
        return [Result("".join(t), s.finish_reason, s.n_new, s.ids, s.logprobs) for s, t in zip(seqs, texts)]
