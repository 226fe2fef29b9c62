"""Reading torchrun's failure output: which rank on which node died first, and why.

torchrun ends a failed job with a ChildFailedError summary ("Failures:" and "Root Cause" blocks); the
workers' stderr lines carry a ``[rankN]:`` prefix. ``explain_failure`` turns both into the lines
`gptforge launch` prints after a failed run.
"""

from __future__ import annotations

import re
import socket
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

_ROOT_RE = re.compile(r"Root Cause \(first observed failure\):")
_FIELD_RE = re.compile(r"^\s*(time|host|rank|exitcode|error_file|traceback)\s*:\s*(.*)$")


_BLOCK_RE = re.compile(r"^\s*\[\d+\]:\s*$")


def parse_failures(lines: Sequence[str]) -> list[dict[str, str]]:
    """Every failure block of torchrun's ChildFailedError summary ("Failures:" and "Root Cause"), the root
    cause first, each a dict (rank, local_rank, host, exitcode, traceback)."""
    text = list(lines)
    starts = [i for i, line in enumerate(text) if _ROOT_RE.search(line) or line.strip() == "Failures:"]
    if not starts:
        return []
    blocks: list[dict[str, str]] = []
    cur: dict[str, str] | None = None
    for line in text[starts[0]:]:
        if _BLOCK_RE.match(line):
            cur = {}
            blocks.append(cur)
            continue
        if cur is None:
            continue
        m = _FIELD_RE.match(line)
        if m:
            cur.setdefault(m.group(1), m.group(2).strip())
        elif line.startswith(("===", "---")):
            cur = None
        elif "traceback" in cur and line.strip():
            cur["traceback"] += "\n" + line.rstrip()
    for b in blocks:
        m = re.match(r"(-?\d+)\s*\(local_rank:\s*(-?\d+)\)", b.get("rank", ""))
        if m:
            b["rank"], b["local_rank"] = m.group(1), m.group(2)
    blocks = [b for b in blocks if "rank" in b]
    # torchrun lists the root cause last; put it first
    return blocks[-1:] + blocks[:-1]


def _first_cause(blocks: list[dict[str, str]], lines: Sequence[str]) -> dict[str, str] | None:
    """torchrun's "root cause" is the first failure it observed, which is often a rank that only lost its
    peer ("Connection reset by peer"). Prefer a rank killed by a signal other than SIGTERM, then a rank
    whose error is not a peer symptom, then torchrun's choice."""
    def signal_of(b):
        m = re.search(r"exitcode\s*:?\s*(-\d+)", "exitcode: " + b.get("exitcode", ""))
        return int(m.group(1)) if m else 0

    for b in blocks:
        if signal_of(b) not in (0, -15):
            return b
    for b in blocks:
        err = _error_line(lines, b.get("rank", "")) or b.get("traceback", "")
        if not any(h in err for h in _PEER_HINTS):
            return b
    return blocks[0] if blocks else None


def parse_failure(lines: Sequence[str]) -> dict[str, str] | None:
    """The failure that most likely started it all (see _first_cause)."""
    return _first_cause(parse_failures(lines), lines)


_PEER_HINTS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "timed out", "Timeout",
               "NCCL error", "ProcessGroupGloo", "DistBackendError", "Socket Timeout", "recvBytes", "Watchdog")


_ERR_RE = re.compile(r"^\[rank(\d+)\]:\s*((?:[\w.]+)(?:Error|Exception|Interrupt)\b.*)$")


def _error_line(lines: Sequence[str], rank: str) -> str | None:
    """The last `[rankN]: SomeError: ...` line the failing rank printed (torch prefixes worker stderr)."""
    found = None
    for line in lines:
        m = _ERR_RE.match(line.strip())
        if m and m.group(1) == rank:
            found = m.group(2)
    return found


def worker_error(line: str) -> str | None:
    """The rank of a `[rankN]: SomeError: ...` line (a worker's last traceback line before it exits), else None."""
    m = _ERR_RE.match(line.strip())
    return m.group(1) if m else None


def hang_diagnosis(lines: Sequence[str]) -> str | None:
    """The line a rank printed when its collective timed out, naming the stuck rank (gptforge.parallel.hang)."""
    for line in lines:
        i = line.find("gptforge hang:")
        if i >= 0 and "stuck:" in line:
            return line[i:].strip()
    return None


def explain_failure(lines: Sequence[str], node_rank: int, rc: int) -> str:
    hang = hang_diagnosis(lines)
    if hang:
        return (f"gptforge launch: node {node_rank} ({socket.gethostname()}): a rank hung: "
                f"{hang.removeprefix('gptforge hang: ')}\ngptforge launch: the job was stopped (exit code {rc})")
    f = parse_failure(lines)
    text = "\n".join(lines[-200:])
    where = f"node {node_rank} ({socket.gethostname()})"
    if f is None:
        if "RendezvousTimeoutError" in text or "RendezvousClosedError" in text or "RendezvousConnectionError" in text:
            return (f"gptforge launch: {where}: the rendezvous failed (exit {rc}): not all nodes joined or the "
                    f"rendezvous host is unreachable; run `gptforge doctor` with the same flags on every node")
        ranks = [r for r in map(worker_error, lines) if r is not None]
        if ranks:  # torchrun was stopped before its summary (its agent waited for an unreachable node 0)
            return (f"gptforge launch: rank {ranks[0]} on {where} failed: {_error_line(lines, ranks[0])[:300]}"
                    f"\ngptforge launch: torchrun exited with code {rc}")
        return f"gptforge launch: {where}: torchrun exited with code {rc}"
    code = f.get("exitcode", "?")
    tb = f.get("traceback", "")
    sig = re.search(r"Signal (\d+) \((\w+)\)", tb) or re.search(r"\((SIG\w+)\)", code)
    code_txt = code.split(" (pid")[0]
    msg = (f"gptforge launch: rank {f.get('rank', '?')} (local rank {f.get('local_rank', '?')}) on {where} "
           f"failed first: exit code {code_txt}")
    if sig:
        msg += f" ({sig.group(sig.lastindex)})"
    err = _error_line(lines, f.get("rank", ""))
    last = [ln.strip() for ln in tb.splitlines() if ln.strip() and ln.strip() != "<N/A>"]
    if err:
        msg += f": {err[:300]}"
    elif last and "pytorch.org/docs" not in last[-1]:
        msg += f": {last[-1][:300]}"
    if not sig and any(h in (err or tb) for h in _PEER_HINTS):
        msg += ("\ngptforge launch: this looks like a consequence of a rank on another node dying or becoming "
                "unreachable; look at the other nodes' output for the first failure")
    msg += "\ngptforge launch: the job was stopped (--max-restarts=0)"
    return msg


def probe(addr: str, port: int, timeout: float = 3.0) -> str | None:
    """None when ``addr`` answers (a connection, or a refusal: the machine is there), else why not."""
    try:
        with socket.create_connection((addr, port), timeout=timeout):
            return None
    except ConnectionRefusedError:
        return None
    except TimeoutError:
        return "no answer within 3 s"
    except OSError as e:
        return e.strerror or str(e)


def unreachable_peers(peers: dict[str, str], node_rank: int, port: int, check=probe) -> str | None:
    """One line naming the other nodes this node cannot reach (peers: {node rank: address}, written by the
    ranks at start-up, gptforge.parallel.mesh.record_peers), or None when every peer answers. The
    nodes are probed in parallel, so this takes at most one probe timeout."""
    others = sorted(((int(n), a) for n, a in peers.items() if int(n) != node_rank))
    with ThreadPoolExecutor(max_workers=max(1, min(16, len(others)))) as pool:
        why = list(pool.map(lambda na: check(na[1], port), others))
    lost = [f"node {n} ({a}): {w}" for (n, a), w in zip(others, why) if w]
    if not lost:
        return None
    return (f"gptforge launch: node {node_rank}: unreachable from this node: {'; '.join(lost)}; the network link "
            f"between the nodes is down or the machine is gone (the run stopped after parallel.timeout_s)")
