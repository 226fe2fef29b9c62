"""Prompts with reference answers for `gptforge grpo`: JSONL records {"prompt": "...", "answer": "..."}
("question" is read as "prompt"; a number as answer is read as its text), and the loader that hands the
trainer a micro-batch of prompt indices with one rollout seed per prompt.

    {"prompt": "12+7=", "answer": "19"}
    {"question": "Natalia sold clips to 48 of her friends ...", "answer": "... #### 72"}      (GSM8K's rows)

The seed of a prompt depends only on (train.seed, epoch, prompt index): the same completions whatever the
number of ranks, and again after a resume (the loader's position is in the checkpoint)."""

from __future__ import annotations

import numpy as np
import torch

from gptforge.data.loader import UnitLoader
from gptforge.data.records import DataStats, read_records
from gptforge.errors import UserError


def to_prompt(obj, where: str) -> tuple[str, str]:
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected an object with 'prompt' and 'answer'")
    prompt = obj.get("prompt", obj.get("question"))
    answer = obj.get("answer")
    if not isinstance(prompt, str) or not prompt.strip():
        raise UserError(f"{where}: missing 'prompt' (a non-empty string)")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str):
        raise UserError(f"{where}: missing 'answer' (the reference the reward checks against)")
    return prompt, answer


def read_prompts(spec, skip_bad: bool = False) -> tuple[list[tuple[str, str]], DataStats]:
    """-> ([(prompt, answer)], stats) of every record of data.path."""
    stats = DataStats()
    out = list(read_records(spec, to_prompt, skip_bad, stats))
    stats.records = stats.examples = len(out)
    if not out:
        raise UserError(f"no prompts in {spec}; give JSONL lines like {{\"prompt\": \"2+3=\", \"answer\": \"5\"}}")
    return out, stats


def prompt_seed(seed: int, epoch: int, index: int) -> int:
    return int(np.random.default_rng([seed, epoch, index]).integers(2 ** 31))


class PromptLoader(UnitLoader):
    """Micro-batches {"idx": prompt indices (B,), "seed": one rollout seed per prompt (B,)}."""

    def __init__(self, n_prompts: int, micro_batch: int, dp_rank: int = 0, dp_size: int = 1, seed: int = 0,
                 shuffle: bool = True, accum_steps: int = 1):
        super().__init__(n_prompts, micro_batch, dp_rank, dp_size, seed, shuffle, accum_steps, name="grpo prompts",
                         unit_name="prompts")

    def collate(self, units, step_units=None) -> dict[str, torch.Tensor]:
        idx = np.asarray(units, dtype=np.int64)
        seeds = [prompt_seed(self.seed, self.epoch, int(i)) for i in idx]
        return {"idx": torch.from_numpy(idx.copy()), "seed": torch.tensor(seeds, dtype=torch.long)}
