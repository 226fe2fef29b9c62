"""SFT data: chat JSONL -> token examples -> packed or length-bucketed batches.

Formats (one JSON object per line, or a JSON array of them; any source of data/sources.py):
    {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}   (+ optional "system")
    {"conversations": [{"from": "human"|"gpt"|"system", "value": ...}, ...]}      (ShareGPT)
    {"instruction": ..., "input": ..., "output": ...}                              (Alpaca, + optional "system")

Loss only on assistant tokens including each turn's <|im_end|> (chat_template.encode_chat); labels are
-100 elsewhere. Examples longer than the context are truncated or dropped (data.overflow), and counted.

Batches (SFTLoader, same interface as data/loader.TokenLoader):
  * packing (sft.packing=true): examples are packed first-fit-decreasing into rows of block_size tokens;
    `doc_ids` (B,T) let a token see only earlier tokens of its own example (the model builds the mask) and `positions`
    restart at 0 for each example, so a packed row computes exactly what the separate examples would.
  * padding: examples of similar length are grouped (length buckets) and right-padded per micro-batch.
Every micro-batch carries `loss_denom` = (label tokens in the whole optimizer step, all ranks and
micro-steps) / (grad_accum * dp_size): the LM objective divides its summed loss by it, so the step's
loss is the mean over all its label tokens whatever the split over ranks and micro-steps (a 2-rank run
equals a 1-rank run with twice the micro-batch)."""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np
import torch

from gptforge.data.chat_template import check_messages, encode_chat
from gptforge.data.loader import UnitLoader
from gptforge.data.records import DataStats, read_records
from gptforge.errors import UserError

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "bing": "assistant",
                  "chatgpt": "assistant", "bard": "assistant", "model": "assistant", "system": "system"}


# ---- conversations ----------------------------------------------------------------------------------
def to_messages(obj, where: str) -> list[dict]:
    """One record in any supported format -> [{"role", "content"}]. Raises UserError naming `where`."""
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    system = obj.get("system")
    if "messages" in obj:
        msgs = obj["messages"]
        if isinstance(msgs, list):
            msgs = [dict(m) if isinstance(m, dict) else m for m in msgs]
    elif "conversations" in obj:
        conv = obj["conversations"]
        if not isinstance(conv, list):
            raise UserError(f"{where}: 'conversations' must be a list")
        msgs = []
        for i, t in enumerate(conv):
            if not isinstance(t, dict):
                raise UserError(f"{where}: conversations[{i}] must be an object")
            if "from" in t:
                role = SHAREGPT_ROLES.get(str(t["from"]).lower())
                if role is None:
                    raise UserError(f"{where}: conversations[{i}] has from={t['from']!r}; expected one of "
                                    f"{', '.join(sorted(SHAREGPT_ROLES))}")
                msgs.append({"role": role, "content": t.get("value")})
            else:
                msgs.append(dict(t))
    elif "instruction" in obj and "output" in obj:
        prompt = obj["instruction"]
        if not isinstance(prompt, str) or not isinstance(obj["output"], str):
            raise UserError(f"{where}: 'instruction' and 'output' must be strings")
        extra = obj.get("input") or ""
        if not isinstance(extra, str):
            raise UserError(f"{where}: 'input' must be a string")
        msgs = [{"role": "user", "content": prompt + ("\n\n" + extra if extra else "")},
                {"role": "assistant", "content": obj["output"]}]
    else:
        raise UserError(f"{where}: unknown record format (keys: {', '.join(list(obj)[:6]) or 'none'}); expected "
                        "'messages', 'conversations' (ShareGPT) or 'instruction'/'output' (Alpaca)")
    if system is not None:
        if not isinstance(system, str):
            raise UserError(f"{where}: 'system' must be a string")
        if system and not (msgs and isinstance(msgs[0], dict) and msgs[0].get("role") == "system"):
            msgs = [{"role": "system", "content": system}, *msgs]
    check_messages(msgs, where)
    if not any(m["role"] == "assistant" for m in msgs):
        raise UserError(f"{where}: the conversation has no assistant message to learn from")
    return msgs


def read_conversations(spec, skip_bad: bool = False, stats: DataStats | None = None) -> tuple[list, DataStats]:
    """All conversations of --data.path (files, folders, globs, datasets: see data/sources.py) -> ([messages], stats)."""
    stats = stats or DataStats()
    convs = list(read_records(spec, to_messages, skip_bad, stats))
    stats.records = len(convs)
    if not convs:
        raise UserError(f"no usable conversations in {spec}"
                        + (f" ({stats.bad_lines} malformed lines skipped)" if stats.bad_lines else ""))
    return convs, stats


# ---- examples ---------------------------------------------------------------------------------------
@dataclass
class Example:
    input_ids: np.ndarray  # (L,) int64
    labels: np.ndarray  # (L,) int64, -100 = not counted

    @property
    def n_labels(self) -> int:
        return int((self.labels != -100).sum())


def make_example(ids: list[int], mask: list[int], block_size: int, overflow: str, stats: DataStats) -> Example | None:
    """Shift ids/mask into (input_ids, labels); apply the overflow rule. None = dropped (counted)."""
    if len(ids) - 1 > block_size:
        if overflow == "drop":
            stats.dropped_long += 1
            return None
        ids, mask = ids[: block_size + 1], mask[: block_size + 1]
        stats.truncated += 1
    a = np.asarray(ids, dtype=np.int64)
    m = np.asarray(mask, dtype=bool)
    labels = np.where(m[1:], a[1:], -100)
    if len(a) < 2 or not (labels != -100).any():
        stats.dropped_empty += 1
        return None
    stats.examples += 1
    return Example(a[:-1].copy(), labels)


def tokenize_conversations(convs: list[list[dict]], tok, block_size: int, overflow: str = "truncate",
                           stats: DataStats | None = None) -> tuple[list[Example], DataStats]:
    stats = stats or DataStats(records=len(convs))
    out = []
    for msgs in convs:
        ex = make_example(*encode_chat(tok, msgs), block_size, overflow, stats)
        if ex is not None:
            out.append(ex)
    return out, stats


# ---- packing ----------------------------------------------------------------------------------------
def pack(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing (best fit via a sorted list of free space) -> rows of example indices."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free space, row id), sorted
    for i in order:
        L = lengths[i]
        if L > capacity:
            raise ValueError(f"example of {L} tokens exceeds the row capacity {capacity}")
        k = bisect.bisect_left(free, (L, -1))
        if k < len(free):
            space, r = free.pop(k)
        else:
            rows.append([])
            space, r = capacity, len(rows) - 1
        rows[r].append(i)
        if space - L > 0:
            bisect.insort(free, (space - L, r))
    for r in rows:
        r.sort()  # keep a deterministic order inside a row
    return rows


def collate_packed(rows: list[list[Example]], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows of examples -> input_ids/labels/positions/doc_ids (B,T); the model masks attention by doc_ids
    (causal within a document; no dense (B,1,T,T) mask: gptforge.model.doc_mask)."""
    T = max(sum(len(e.input_ids) for e in row) for row in rows)
    B = len(rows)
    ids = np.full((B, T), pad_id, dtype=np.int64)
    labels = np.full((B, T), -100, dtype=np.int64)
    pos = np.zeros((B, T), dtype=np.int64)
    doc = np.full((B, T), -1, dtype=np.int64)  # the padding tail is one more "document"
    for b, row in enumerate(rows):
        o = 0
        for d, e in enumerate(row):
            L = len(e.input_ids)
            ids[b, o:o + L], labels[b, o:o + L] = e.input_ids, e.labels
            pos[b, o:o + L], doc[b, o:o + L] = np.arange(L), d
            o += L
        pos[b, o:] = np.arange(T - o)
    return {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels),
            "positions": torch.from_numpy(pos), "doc_ids": torch.from_numpy(doc)}


def collate_padded(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right padding to the longest example; causal attention never sees the padding."""
    T = max(len(e.input_ids) for e in examples)
    ids = np.full((len(examples), T), pad_id, dtype=np.int64)
    labels = np.full((len(examples), T), -100, dtype=np.int64)
    for b, e in enumerate(examples):
        ids[b, :len(e.input_ids)], labels[b, :len(e.labels)] = e.input_ids, e.labels
    return {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels)}


class SFTLoader(UnitLoader):
    def __init__(self, examples: list[Example], block_size: int, micro_batch: int, pad_id: int, packing: bool = True,
                 dp_rank: int = 0, dp_size: int = 1, seed: int = 0, shuffle: bool = True, accum_steps: int = 1,
                 bucket_batches: int = 64):
        if not examples:
            raise UserError("no SFT examples to train on")
        self.examples, self.pad_id, self.packing, self.block_size = examples, pad_id, packing, block_size
        self.bucket_batches = bucket_batches
        lengths = [len(e.input_ids) for e in examples]
        self.rows = pack(lengths, block_size) if packing else [[i] for i in range(len(examples))]
        self.unit_labels = np.array([sum(examples[i].n_labels for i in r) for r in self.rows], dtype=np.int64)
        self.unit_len = np.array([sum(lengths[i] for i in r) for r in self.rows], dtype=np.int64)
        super().__init__(len(self.rows), micro_batch, dp_rank, dp_size, seed, shuffle, accum_steps, name="sft data")

    @property
    def fill(self) -> float:
        """Fraction of row tokens that are real (packing efficiency)."""
        return float(self.unit_len.sum()) / (len(self.rows) * self.block_size)

    def epoch_order(self, epoch: int) -> np.ndarray:
        order = super().epoch_order(epoch)
        if self.packing or not self.shuffle:
            return order
        # length buckets: sort chunks of `bucket_batches` optimizer steps by length, then shuffle the steps
        # (grouped per optimizer step, so any split over ranks and micro-steps sees the same sequences)
        G = self.per_step
        chunk = G * self.bucket_batches
        parts = [order[i:i + chunk] for i in range(0, len(order), chunk)]
        parts = [p[np.argsort(-self.unit_len[p], kind="stable")] for p in parts]
        flat = np.concatenate(parts)
        nb = len(flat) // G
        batches = [flat[i * G:(i + 1) * G] for i in range(nb)]
        perm = np.random.default_rng([self.seed, epoch, 1]).permutation(nb)
        return np.concatenate([batches[i] for i in perm] + [flat[nb * G:]])

    def collate(self, units, step_units):
        if self.packing:
            batch = collate_packed([[self.examples[i] for i in self.rows[u]] for u in units], self.pad_id)
        else:
            batch = collate_padded([self.examples[self.rows[u][0]] for u in units], self.pad_id)
        if step_units is not None:
            n = max(1, int(self.unit_labels[step_units].sum()))
            batch["loss_denom"] = torch.tensor(n / (self.accum_steps * self.dp_size), dtype=torch.float32)
        return batch
