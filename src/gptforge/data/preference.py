"""Preference pairs for DPO.

One JSON object per line, or a JSON array of them (any source of data/sources.py):
    {"prompt": "...", "chosen": "...", "rejected": "..."}                 strings: one user turn, one reply
    {"prompt": [messages...], "chosen": [messages...], "rejected": ...}   message lists (prompt may hold a system
                                                                           turn and earlier turns)
chosen/rejected as message lists may repeat the prompt (the Hugging Face "full conversation" style): the
shared prefix is removed. Without "prompt", the common prefix of chosen and rejected is the prompt.

Each side is rendered with the chat template; only the final assistant turn (content + <|im_end|>) is
scored. A batch holds the B chosen rows followed by the B rejected rows (input_ids/labels (2B, T)), and
`ref_logps` (2B,) once the reference log-probs are precomputed."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from gptforge.data.chat_template import check_messages, encode_chat
from gptforge.data.loader import UnitLoader
from gptforge.data.records import DataStats, read_records
from gptforge.data.sft import Example, collate_padded, make_example
from gptforge.errors import UserError


def _side(value, name: str, where: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list):
        return check_messages([dict(m) if isinstance(m, dict) else m for m in value], f"{where}: '{name}'")
    raise UserError(f"{where}: '{name}' must be a string or a list of messages")


def to_pair(obj, where: str) -> tuple[list[dict], list[dict], list[dict]]:
    """-> (prompt messages, chosen continuation, rejected continuation)."""
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for k in ("chosen", "rejected"):
        if k not in obj:
            raise UserError(f"{where}: missing '{k}' (a preference pair needs 'prompt', 'chosen', 'rejected')")
    chosen, rejected = _side(obj["chosen"], "chosen", where), _side(obj["rejected"], "rejected", where)
    if "prompt" in obj:
        p = obj["prompt"]
        if isinstance(p, str):
            prompt = [{"role": "user", "content": p}]
        elif isinstance(p, list):
            prompt = check_messages([dict(m) if isinstance(m, dict) else m for m in p], f"{where}: 'prompt'")
        else:
            raise UserError(f"{where}: 'prompt' must be a string or a list of messages")
        for side in (chosen, rejected):
            if len(side) > len(prompt) and side[:len(prompt)] == prompt:
                del side[:len(prompt)]
    else:
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        if not prompt:
            raise UserError(f"{where}: no 'prompt' and chosen/rejected share no leading turns")
    system = obj.get("system")
    if isinstance(system, str) and system and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": system}, *prompt]
    for name, side in (("chosen", chosen), ("rejected", rejected)):
        if not side or side[-1]["role"] != "assistant":
            raise UserError(f"{where}: '{name}' must end with an assistant reply")
    return prompt, chosen, rejected


@dataclass
class Pair:
    chosen: Example
    rejected: Example


def read_pairs(spec, tok, block_size: int, overflow: str = "truncate", skip_bad: bool = False) -> tuple[list[Pair], DataStats]:
    stats = DataStats()
    pairs: list[Pair] = []
    for prompt, chosen, rejected in read_records(spec, to_pair, skip_bad, stats):
        stats.records += 1
        sides = []
        for cont in (chosen, rejected):
            ids, mask = encode_chat(tok, prompt + cont, train_on="last")
            sides.append(make_example(ids, mask, block_size, overflow, stats))
        if sides[0] is None or sides[1] is None:
            stats.examples -= sum(s is not None for s in sides)
            continue
        if _same(sides[0], sides[1]):  # chosen == rejected (as trained): a zero gradient, nothing to learn
            stats.examples -= 2
            stats.extra["identical"] = stats.extra.get("identical", 0) + 1
            continue
        pairs.append(Pair(sides[0], sides[1]))
    stats.examples //= 2
    same = stats.extra.get("identical", 0)
    if not pairs and same and same == stats.records:
        raise UserError(f"every pair in {spec} has 'chosen' identical to 'rejected' ({same} pairs); DPO learns "
                        "nothing from them: give pairs whose answers differ")
    if not pairs:
        raise UserError(f"no usable preference pairs in {spec} ({stats.summary('pairs')})")
    return pairs, stats


def _same(a: Example, b: Example) -> bool:
    return np.array_equal(a.input_ids, b.input_ids) and np.array_equal(a.labels, b.labels)


class PairLoader(UnitLoader):
    def __init__(self, pairs: list[Pair], micro_batch: int, pad_id: int, dp_rank: int = 0, dp_size: int = 1,
                 seed: int = 0, shuffle: bool = True, accum_steps: int = 1):
        self.pairs, self.pad_id = pairs, pad_id
        self.ref: np.ndarray | None = None  # (n, 2): reference log-probs of (chosen, rejected)
        super().__init__(len(pairs), micro_batch, dp_rank, dp_size, seed, shuffle, accum_steps, name="dpo pairs")

    def set_reference(self, ref: np.ndarray) -> None:
        if ref.shape != (len(self.pairs), 2):
            raise ValueError(f"reference log-probs of shape {ref.shape}, expected {(len(self.pairs), 2)}")
        self.ref = ref

    def collate(self, units, step_units=None):
        ps = [self.pairs[int(u)] for u in units]
        batch = collate_padded([p.chosen for p in ps] + [p.rejected for p in ps], self.pad_id)
        if self.ref is not None:
            r = self.ref[np.asarray(units, dtype=np.int64)]
            batch["ref_logps"] = torch.from_numpy(np.concatenate([r[:, 0], r[:, 1]])).float()
        return batch

    def iter_all(self, micro_batch: int, dp_rank: int = 0, dp_size: int = 1):
        """(indices, batch) over this rank's share (i % dp_size == dp_rank) of all pairs, for precomputing."""
        mine = np.arange(dp_rank, len(self.pairs), dp_size)
        for i in range(0, len(mine), micro_batch):
            idx = mine[i:i + micro_batch]
            yield idx, self.collate(idx)
