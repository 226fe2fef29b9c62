"""`gptforge <command> ...`: a thin dispatcher. Each command lives in its own module as main(argv) -> int."""

from __future__ import annotations

import importlib
import sys

from gptforge.errors import UserError

# command -> (module, function, one-line help). Modules are imported lazily so `gptforge --help` is fast.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "pretrain": ("gptforge.train.entry", "pretrain_main", "train a GPT from scratch (default: Shakespeare)"),
    "sft": ("gptforge.train.entry", "sft_main", "supervised fine-tuning on chat data"),
    "dpo": ("gptforge.train.entry", "dpo_main", "direct preference optimisation"),
    "prepare": ("gptforge.data.prepare", "main", "tokenize text/JSONL/HF datasets into token shards"),
    "train-tokenizer": ("gptforge.data.tokenizer", "main", "train a byte-level BPE tokenizer"),
    "generate": ("gptforge.serve.generate", "main", "sample text from a checkpoint"),
    "chat": ("gptforge.serve.chat", "main", "interactive chat with a checkpoint"),
    "export-hf": ("gptforge.hf.export", "main", "export a checkpoint to Hugging Face format"),
    "launch": ("gptforge.launch.torchrun", "main", "build and run the torchrun command for this node"),
    "doctor": ("gptforge.launch.doctor", "main", "check GPUs, network and peers before a run"),
    "slurm": ("gptforge.launch.slurm", "main", "write an sbatch script"),
    "k8s": ("gptforge.launch.k8s", "main", "write Kubernetes manifests"),
    "bench": ("gptforge.bench", "main", "measure training throughput"),
}


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
        import difflib

        near = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f"; did you mean '{near[0]}'?" if near else "; run 'gptforge --help' for the list"
        print(f"gptforge: error: unknown command '{name}'{hint}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[name]
    try:
        return int(getattr(importlib.import_module(module), func)(rest) or 0)
    except UserError as e:
        print(f"gptforge: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gptforge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
