"""`gptforge chat`: driven in a pseudo-terminal as a person would, history trimming, --message mode."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import time

import pytest

from gptforge.serve.chat import ChatSession
from gptforge.errors import UserError
from gptforge.hf.inference import load_for_inference
from support.stage_fixtures import HELD_OUT, sft_reverse_run  # noqa: F401

ANSI = re.compile(r"\x1b\[[0-9;?]*[a-zA-Z]|\r")


class Terminal:
    """A child process on a pty; expect() reads until a pattern appears (like pexpect)."""

    def __init__(self, argv: list[str]):
        self.master, slave = pty.openpty()
        env = dict(os.environ, TERM="dumb", COLUMNS="120")
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True,
                                     start_new_session=True)
        os.close(slave)
        self.buf = ""

    def expect(self, pattern: str, timeout: float = 60) -> str:
        end = time.monotonic() + timeout
        while True:
            text = ANSI.sub("", self.buf)
            m = re.search(pattern, text)
            if m:
                self.buf = text[m.end():]
                return text[:m.end()]
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {pattern!r}; got so far:\n{text}")
            r, _, _ = select.select([self.master], [], [], min(left, 0.5))
            if r:
                try:
                    data = os.read(self.master, 4096)
                except OSError:  # the child closed the terminal
                    data = b""
                if not data and self.proc.poll() is not None:
                    raise AssertionError(f"process ended (rc {self.proc.returncode}) before {pattern!r}:\n{text}")
                self.buf += data.decode("utf-8", "replace")

    def send(self, line: str) -> None:
        os.write(self.master, (line + "\r").encode())

    def close(self) -> int:
        try:
            return self.proc.wait(timeout=30)
        finally:
            os.close(self.master)


def test_chat_in_a_terminal_two_turns_reset_exit(sft_reverse_run):
    t = Terminal([sys.executable, "-m", "gptforge", "chat", "--checkpoint", str(sft_reverse_run),
                  "--temperature", "0", "--max-new-tokens", "8"])
    try:
        banner = t.expect(r"you> ")
        assert "gptforge chat" in banner and "/reset" in banner
        w1, w2, w3 = HELD_OUT[0], HELD_OUT[1], HELD_OUT[2]
        t.send(w1)
        turn1 = t.expect(r"you> ")
        assert f"bot> {w1[::-1]}\n" in turn1, turn1
        t.send(w2)  # the second turn sees the first in its prompt (trained on 1-2 turn chats)
        turn2 = t.expect(r"you> ")
        assert f"bot> {w2[::-1]}\n" in turn2, turn2
        t.send(w3)  # the third no longer fits the 64-token context: the oldest turn goes, with a notice
        turn3 = t.expect(r"you> ")
        assert "dropped the 1 oldest turn" in turn3 and f"bot> {w3[::-1]}\n" in turn3, turn3
        t.send("/reset")
        assert "[conversation reset]" in t.expect(r"you> ")
        t.send(w1)
        again = t.expect(r"you> ")
        assert f"bot> {w1[::-1]}\n" in again and "dropped" not in again, again
        t.send("/nonsense")
        assert "unknown command /nonsense" in t.expect(r"you> ")
        t.send("/exit")
        assert t.close() == 0
    finally:
        if t.proc.poll() is None:
            t.proc.kill()


@pytest.fixture(scope="module")
def loaded(sft_reverse_run):
    model, tok, _ = load_for_inference(str(sft_reverse_run), "cpu")
    return model, tok


def test_history_trimming_keeps_system_and_latest(loaded):
    model, tok = loaded
    notices = []
    s = ChatSession(model, tok, system="ab", max_new_tokens=8, temperature=0, notice=notices.append)
    for w in HELD_OUT[:4]:
        s.reply(w)
    assert len(notices) >= 2 and all("oldest turn" in n for n in notices)
    assert 1 <= len(s.turns) < 4 and s.turns[-1][0] == HELD_OUT[3]  # the latest turn stays
    ids = s.prompt_ids("abcd")
    assert len(ids) + s.reserve <= model.cfg.block_size
    assert tok.decode(ids).startswith("<|im_start|>system\nab<|im_end|>")  # the system turn stays
    assert tok.decode(ids).endswith("<|im_start|>user\nabcd<|im_end|>\n<|im_start|>assistant\n")
    s.reset()
    assert s.turns == []
    with pytest.raises(UserError, match="exceeds the context"):
        s.prompt_ids("a" * 100)


def test_streaming_pieces_equal_reply_and_seed_is_reproducible(loaded):
    model, tok = loaded
    pieces = []
    s = ChatSession(model, tok, max_new_tokens=10, temperature=1.0, seed=3)
    text = s.reply("abcd", on_text=pieces.append)
    assert "".join(pieces) == text
    assert ChatSession(model, tok, max_new_tokens=10, temperature=1.0, seed=3).reply("abcd") == text
