"""`gptforge generate --checkpoint DIR`: sample text from a checkpoint, streamed as it is sampled."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from gptforge.errors import UserError
from gptforge.hardware import check_device_name
from gptforge.hf.inference import load_for_inference
from gptforge.model.engine import Engine, Params
from gptforge.model.sampling import check_prompt, check_sampling


@dataclass
class GenerateOptions:
    """Sample text from a checkpoint."""

    checkpoint: str
    """checkpoint dir, run dir (latest checkpoint) or Hugging Face folder (e.g. an export-hf output)"""
    prompt: str = "\n"
    """the text to continue"""
    max_new_tokens: int = 200
    """tokens to sample (fewer when the context ends)"""
    temperature: float = 0.8
    """0 = greedy"""
    top_k: int = 200
    """sample among the k most likely tokens (0 = all)"""
    top_p: float | None = None
    """sample among the most likely tokens holding this probability mass"""
    seed: int | None = None
    """random seed (sample i uses seed + i)"""
    num_samples: int = 1
    """how many samples to write"""
    no_cache: bool = False
    """recompute the whole sequence each step"""
    device: str = "auto"
    """auto (a GPU when there is one) | cpu | cuda | cuda:N"""


def check_options(opts: GenerateOptions) -> None:
    """Every flag checked before the model is loaded."""
    check_sampling(opts.max_new_tokens, opts.temperature, opts.top_k, opts.top_p)
    if opts.num_samples < 1:
        raise UserError(f"--num-samples must be at least 1, got {opts.num_samples}")
    check_device_name(opts.device, "--device")


def main(opts: GenerateOptions) -> int:
    check_options(opts)
    model, tok, _ = load_for_inference(opts.checkpoint, opts.device)
    prompt = tok.encode_prompt(opts.prompt)  # with the BOS a Llama-style tokenizer adds, as transformers
    n_prompt = len(prompt)
    check_prompt(n_prompt, model.cfg.block_size)
    engine = Engine(model, tok, use_cache=not opts.no_cache)  # the engine of chat and serve: same seed, same text
    stop = frozenset(tok.end_ids)  # the folder's eos ids; a chat checkpoint's <|im_end|> too
    for i in range(opts.num_samples):
        if i:
            print("\n---")
        sys.stdout.write(opts.prompt)
        seed = None if opts.seed is None else opts.seed + i
        out = lambda s: (sys.stdout.write(s), sys.stdout.flush())  # noqa: E731
        r = engine.run(prompt, Params(opts.max_new_tokens, opts.temperature, opts.top_k or None, opts.top_p, seed,
                                      stop), out)
        reason, n_new = r.finish_reason, r.n_new
        print()
        if reason == "length" and n_new < opts.max_new_tokens:
            print(f"note: sample {i + 1} stopped at the context of {model.cfg.block_size} tokens after "
                  f"{n_new} new tokens (--max-new-tokens {opts.max_new_tokens}; the prompt is "
                  f"{n_prompt} tokens)", file=sys.stderr, flush=True)
    return 0
