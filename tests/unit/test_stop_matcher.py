"""The engine's stop-string matcher (model.engine.StopMatcher): the text cut where the old whole-text search
cut it, and work linear in the text whatever the stop strings' lengths (issue 22 row 1: the old hold-back
check was quadratic in a stop's length, on the engine thread every request shares)."""

from __future__ import annotations

import random

from gptforge.model.engine import StopMatcher


def reference(pieces: list[str], stops: tuple[str, ...]) -> tuple[str, bool]:
    """The specification, by brute force: after each piece, the text so far is searched for every stop; at the
    first piece where one occurs, the text is cut before the occurrence that starts first."""
    text = ""
    for p in pieces:
        text += p
        found = [i for i in (text.find(s) for s in stops if s) if i >= 0]
        if found:
            return text[:min(found)], True
    return text, False


def run(pieces: list[str], stops: tuple[str, ...]) -> tuple[str, bool, StopMatcher, list[str]]:
    m = StopMatcher(stops)
    outs = []
    for p in pieces:
        outs.append(m.push(p))
        if m.hit:
            break
    text = "".join(outs) + ("" if m.hit else m.flush())
    return text, m.hit, m, outs


def test_cases():
    # across token boundaries: nothing of a possible stop goes out early
    text, hit, _, outs = run(["ab<|im", "_e", "nd|>x"], ("<|im_end|>",))
    assert (outs, text, hit) == (["ab", "", ""], "ab", True)
    # at the very end of a piece, and of the text
    assert run(["hello", " wor", "ld"], ("world",))[:2] == ("hello ", True)
    # several stops completing in one piece: the one that starts first wins, whatever the order given
    for stops in (("abcd", "bc"), ("bc", "abcd")):
        assert run(["xabcdy"], stops)[:2] == ("x", True)
    # ... but the first stop to complete ends the text: a longer one starting earlier cannot finish later
    assert run(["abc", "de"], ("abcde", "c"))[:2] == ("ab", True)
    # a held-back tail that never became a stop comes out at the end
    text, hit, m, outs = run(["ab<|i", "m"], ("<|im_end|>",))
    assert (outs, text, hit) == (["ab", ""], "ab<|im", False)
    # empty and repeated stops are ignored; no stops: everything passes through at once
    assert run(["a", "b"], ("", "zz", "zz"))[3] == ["a", "b"]
    assert run(["a", "b"], ())[3] == ["a", "b"]


def test_matches_the_brute_force_reference():
    rng = random.Random(0)
    for _ in range(3000):
        text = "".join(rng.choice("aab") for _ in range(rng.randint(0, 30)))
        cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(0, 8)))) if len(text) > 1 \
            else []
        pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]
        stops = tuple("".join(rng.choice("ab") for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 4)))
        assert run(pieces, stops)[:2] == reference(pieces, stops), (pieces, stops)


def test_work_is_linear_in_the_text_whatever_the_stop_lengths():
    """Four stops of 1,000 characters built to make a naive matcher backtrack ('aaa...ab'), 6,000 characters
    of 'a' in pieces of 1 to 3 characters: the old matcher sliced every prefix of every stop after each piece
    (~4 x 1000^2 / 2 characters a piece); this one takes a bounded number of steps per character and stop."""
    n_stop, n_text = 1000, 6_000
    stops = tuple("a" * (n_stop - 1 - k) + "b" * (k + 1) for k in range(4))
    rng = random.Random(1)
    m, out, fed, longest_pending = StopMatcher(stops), [], 0, 0
    while fed < n_text:
        k = min(rng.randint(1, 3), n_text - fed)
        out.append(m.push("a" * k))
        fed += k
        longest_pending = max(longest_pending, len(m.pending))
    assert not m.hit and longest_pending == n_stop - 1  # the tail that could still become 'aaa...ab'
    assert "".join(out) + m.pending == "a" * n_text
    assert m.examined <= 2 * len(stops) * n_text, m.examined  # each character: one step in, at most one back
    # the stop completes after that long run: the text is cut exactly before it
    out.append(m.push("b"))
    assert m.hit and "".join(out) == "a" * (n_text - (n_stop - 1))
