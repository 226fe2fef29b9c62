"""`gptforge <command> ...`: the face. A command is a function whose one parameter is its options
dataclass, e.g. ``def main(opts: GenerateOptions) -> int``; every command is parsed the same way
(``gptforge.options``, tyro). Training stages take the whole ``Config`` with ``--config FILE`` and
``--section.key=value`` and their stage defaults (``fn.defaults``). Command modules are imported lazily
so ``gptforge --help`` is fast; a ``UserError`` is printed as one line, never a traceback.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import sys
import typing

from gptforge.errors import UserError
from gptforge.options import parse_options

# command -> (module, function, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "pretrain": ("gptforge.train.recipes", "pretrain", "train a GPT from scratch (default: Shakespeare)"),
    "sft": ("gptforge.train.recipes", "sft", "supervised fine-tuning on chat data"),
    "dpo": ("gptforge.train.recipes", "dpo", "direct preference optimisation"),
    "grpo": ("gptforge.train.grpo", "grpo", "reinforcement learning on checkable answers (GRPO)"),
    "distill": ("gptforge.train.distill", "distill", "train a smaller student on a teacher's distribution"),
    "prepare": ("gptforge.data.prepare", "main", "tokenize text/JSONL/HF datasets into token shards"),
    "train-tokenizer": ("gptforge.data.tokenizer", "main", "train a byte-level BPE tokenizer"),
    "generate": ("gptforge.serve.generate", "main", "sample text from a checkpoint"),
    "chat": ("gptforge.serve.chat", "main", "interactive chat with a checkpoint"),
    "serve": ("gptforge.serve.server", "main", "OpenAI-compatible API and web chat for a checkpoint"),
    "eval": ("gptforge.evaluate.command", "main", "perplexity, bits per byte, multiple-choice, generative and harness tasks"),
    "export-hf": ("gptforge.hf.export", "main", "export a checkpoint to Hugging Face format"),
    "export-gguf": ("gptforge.hf.gguf_export", "main", "export a checkpoint as a GGUF file (llama.cpp, Ollama)"),
    "launch": ("gptforge.launch.torchrun", "main", "build and run the torchrun command for this node"),
    "doctor": ("gptforge.launch.doctor.command", "main", "check GPUs, network and peers before a run"),
    "slurm": ("gptforge.launch.slurm", "main", "write an sbatch script"),
    "k8s": ("gptforge.launch.k8s", "main", "write Kubernetes manifests"),
    "bench": ("gptforge.bench", "main", "measure training throughput"),
}


def _options_type(fn) -> type:
    hints = typing.get_type_hints(fn)
    params = [h for k, h in hints.items() if k != "return"]
    if len(params) != 1 or not dataclasses.is_dataclass(params[0]):
        raise TypeError(f"{fn.__qualname__} must take one options dataclass")
    return params[0]


def run_command(name: str, argv: list[str]) -> int:
    module, func, _ = COMMANDS[name]
    fn = getattr(importlib.import_module(module), func)
    cls = _options_type(fn)
    prog = f"gptforge {name}"
    if hasattr(fn, "defaults"):  # training stages: Config from stage defaults, a config file, overrides
        from gptforge.config.loader import parse_config  # here, not at the top: `gptforge --help` stays fast

        opts = parse_config(argv, fn.defaults, prog)
    else:
        try:
            opts = parse_options(cls, argv, prog)
        except UserError as e:  # e.g. `slurm: ` for the commands whose every error names them
            raise UserError(getattr(cls, "error_prefix", "") + str(e)) from None
    return int(fn(opts) or 0)


def _usage() -> str:
    lines = ["usage: gptforge <command> [options]   (gptforge <command> --help for its options)", "", "commands:"]
    lines += [f"  {name:<16} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from gptforge import __version__

        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        near = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f"; did you mean '{near[0]}'?" if near else "; run 'gptforge --help' for the list"
        print(f"gptforge: error: unknown command '{name}'{hint}", file=sys.stderr)
        return 2
    try:
        return run_command(name, rest)
    except UserError as e:
        print(f"gptforge: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gptforge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
