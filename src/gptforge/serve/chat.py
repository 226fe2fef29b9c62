"""`gptforge chat --checkpoint DIR`: multi-turn chat in the terminal, replies streamed as they are sampled.

The conversation is rendered with the ChatML template the model was fine-tuned with. When the history
no longer fits the context (prompt + room for the reply), the oldest turns are dropped, with a notice;
the system message is kept. Commands: /reset, /system TEXT, /exit (also Ctrl-D), /help.

    gptforge chat --checkpoint runs/dpo
    gptforge chat --checkpoint runs/sft --message "Hello" --message "And then?"   # scripts: replies on stdout
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Annotated, Callable

import tyro

from gptforge.data.chat_template import CHAT_TEMPLATE_FILE, encode_chat, stop_ids
from gptforge.errors import UserError
from gptforge.hf.inference import has_chat_template, load_for_inference
from gptforge.hardware import check_device_name
from gptforge.model.engine import Engine, Params
from gptforge.model.sampling import check_sampling

HELP = "commands: /reset (forget the conversation), /system TEXT (set the system message), /exit, /help"


class ChatSession:
    """The conversation state and the reply loop, independent of the terminal (tests drive it directly)."""

    def __init__(self, model, tok, system: str | None = None, max_new_tokens: int = 256, temperature: float = 0.7,
                 top_k: int | None = 50, top_p: float | None = None, seed: int | None = None,
                 notice: Callable[[str], None] | None = None):
        self.model, self.tok = model, tok
        self.system = system or None
        self.turns: list[tuple[str, str]] = []  # (user, assistant)
        self.max_new_tokens, self.temperature, self.top_k, self.top_p = max_new_tokens, temperature, top_k, top_p
        self.seed, self.n_replies = seed, 0
        self.notice = notice or (lambda s: print(s, file=sys.stderr, flush=True))
        self.block = model.cfg.block_size
        self.stops = stop_ids(tok)
        self.engine = Engine(model, tok)  # the engine of generate and serve: same seed, same text

    @property
    def reserve(self) -> int:
        """Tokens kept free for the reply."""
        return max(1, min(self.max_new_tokens, self.block // 4))

    def messages(self, user: str, turns=None) -> list[dict]:
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        for u, a in self.turns if turns is None else turns:
            msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
        return msgs + [{"role": "user", "content": user}]

    def prompt_ids(self, user: str) -> list[int]:
        """The prompt for `user`; drops the oldest turns (with a notice) until prompt + reply room fit."""
        dropped = 0
        while True:
            ids, _ = encode_chat(self.tok, self.messages(user, self.turns[dropped:]), add_generation_prompt=True)
            if len(ids) + self.reserve <= self.block or dropped == len(self.turns):
                break
            dropped += 1
        if len(ids) + self.reserve > self.block:
            what = "your message and the system message" if self.system else "your message"
            raise UserError(f"{what} take {len(ids)} tokens; with room for a reply that exceeds the context of "
                            f"{self.block} tokens; write less (or shorten the system message with /system)")
        if dropped:
            self.turns = self.turns[dropped:]
            self.notice(f"[history: dropped the {dropped} oldest turn{'s' if dropped > 1 else ''} to fit the "
                        f"context of {self.block} tokens]")
        return ids

    def reply(self, user: str, on_text: Callable[[str], None] | None = None, ids: list[int] | None = None) -> str:
        """Sample the reply to `user` (streamed to on_text); `ids`: its prompt_ids() if already computed."""
        ids = self.prompt_ids(user) if ids is None else ids
        pieces: list[str] = []
        seed = None if self.seed is None else self.seed + self.n_replies
        self.n_replies += 1
        params = Params(self.max_new_tokens, self.temperature, self.top_k, self.top_p, seed, frozenset(self.stops))

        def take(piece: str) -> None:
            pieces.append(piece)
            if on_text:
                on_text(piece)

        try:
            self.engine.run(ids, params, take)
        finally:  # also on Ctrl-C: the partial reply stays in the history
            self.turns.append((user, "".join(pieces)))
        return "".join(pieces)

    def reset(self) -> None:
        self.turns = []


def _write(s: str) -> None:
    sys.stdout.write(s)
    sys.stdout.flush()


def interactive(session: ChatSession, banner: str) -> int:
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401 - line editing and history for input()
        except ImportError:
            pass
    print(banner)
    print(HELP)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print("\n(/exit or Ctrl-D to quit)")
            continue
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            cmd, _, arg = text.partition(" ")
            if cmd in ("/exit", "/quit"):
                return 0
            if cmd == "/reset":
                session.reset()
                print("[conversation reset]")
            elif cmd == "/system":
                session.system = arg.strip() or None
                session.reset()
                print(f"[system message {'set' if session.system else 'cleared'}; conversation reset]")
            elif cmd == "/help":
                print(HELP)
            else:
                print(f"unknown command {cmd}; {HELP}")
            continue
        try:
            ids = session.prompt_ids(line)  # any notice about dropped turns comes before the reply
        except UserError as e:
            print(f"[{e}]")
            continue
        _write("bot> ")
        try:
            session.reply(line, on_text=_write, ids=ids)
        except KeyboardInterrupt:
            _write(" [interrupted]")
        print()


@dataclass
class ChatOptions:
    """Chat with a fine-tuned checkpoint."""

    checkpoint: str
    """checkpoint dir, run dir (latest checkpoint) or Hugging Face folder (e.g. an export-hf output)"""
    message: Annotated[list[str], tyro.conf.UseAppendAction] = field(default_factory=list)
    """non-interactive: send this message (repeat for several turns), print each reply, exit"""
    system: str | None = None
    """system message"""
    max_new_tokens: int = 256
    """most tokens per reply"""
    temperature: float = 0.7
    """0 = greedy"""
    top_k: int = 50
    """sample among the k most likely tokens (0 = all)"""
    top_p: float | None = None
    """sample among the most likely tokens holding this probability mass"""
    seed: int | None = None
    """random seed (reply i uses seed + i)"""
    device: str = "auto"
    """auto (a GPU when there is one) | cpu | cuda | cuda:N"""
    allow_base: bool = False
    """chat with a checkpoint that was never fine-tuned for chat (no chat template: pretrain only)"""


def check_chat_checkpoint(checkpoint: str, allow_base: bool) -> None:
    """A checkpoint without the chat template was never fine-tuned for chat: refuse (one line), unless allowed."""
    if not has_chat_template(checkpoint) and not allow_base:
        raise UserError(f"checkpoint '{checkpoint}' was never fine-tuned for chat (no {CHAT_TEMPLATE_FILE}: a "
                        f"pretrain checkpoint); fine-tune it first (gptforge sft --init-from {checkpoint} ...), "
                        f"sample it with gptforge generate, or pass --allow-base to chat anyway")


def main(opts: ChatOptions) -> int:
    check_sampling(opts.max_new_tokens, opts.temperature, opts.top_k, opts.top_p)
    check_device_name(opts.device, "--device")
    check_chat_checkpoint(opts.checkpoint, opts.allow_base)
    model, tok, _ = load_for_inference(opts.checkpoint, opts.device)
    session = ChatSession(model, tok, opts.system, opts.max_new_tokens, opts.temperature, opts.top_k or None,
                          opts.top_p, opts.seed)
    if opts.message:
        for m in opts.message:
            print(session.reply(m), flush=True)
        return 0
    banner = (f"gptforge chat: {opts.checkpoint} ({model.num_params() / 1e6:.1f}M parameters, context "
              f"{model.cfg.block_size} tokens)")
    return interactive(session, banner)
