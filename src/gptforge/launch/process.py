"""Running child processes for `gptforge launch`: copy their output line by line, forward signals, stop
torchrun when the hostfile launcher goes away, and stop a group of remote nodes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from typing import IO

from gptforge.launch.failures import explain_failure, unreachable_peers, worker_error

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)  # passed on to torchrun
STUCK_GRACE = 15  # seconds torchrun may take to end after one of its ranks failed
KILL_GRACE = 5  # seconds between SIGTERM and SIGKILL then


class SignalTraceback:
    """Hold back a traceback until its last line: drop it when it is torchrun's own SignalException (torchrun
    got the stop signal `launch` forwarded; the workers' "stopped by ..." line says what happened), pass on
    any other."""

    def __init__(self):
        self.held: list[str] = []

    def __call__(self, line: str) -> list[str]:
        if not self.held and not line.startswith("Traceback (most recent call last):"):
            return [line]
        self.held.append(line)
        if len(self.held) == 1 or line[:1] in (" ", "\t") or not line.strip():
            return []
        held, self.held = self.held, []
        return [] if "SignalException" in line else held

    def flush(self) -> list[str]:
        held, self.held = self.held, []
        return held


def pump(src: IO[bytes], dst: IO[str], keep: deque | None, prefix: str = "",
         failed: threading.Event | None = None, hide=None) -> None:
    """Copy ``src`` to ``dst`` a line at a time (with ``prefix``), keeping the lines in ``keep``; set ``failed``
    at the first line of a worker's error (failures.worker_error); ``hide``: a SignalTraceback filter."""
    def write(lines: list[str]) -> None:
        try:
            dst.write("".join(prefix + x for x in lines))
            dst.flush()
        except (BrokenPipeError, ValueError):
            pass

    for raw in iter(src.readline, b""):
        line = raw.decode(errors="replace")
        write(hide(line) if hide is not None else [line])
        if keep is not None:
            keep.append(line.rstrip("\n"))
        if failed is not None and not failed.is_set() and (worker_error(line) is not None
                                                           or "gptforge hang:" in line):
            failed.set()  # a rank failed (or timed out in a collective): look for unreachable peers at the end
    if hide is not None:
        write(hide.flush())
    src.close()


def start_pump(src: IO[bytes], dst: IO[str], keep: deque | None = None, prefix: str = "",
               failed: threading.Event | None = None, hide=None) -> threading.Thread:
    t = threading.Thread(target=pump, args=(src, dst, keep, prefix, failed, hide), daemon=True)
    t.start()
    return t


def _wait(proc: subprocess.Popen, failed: threading.Event, force: bool = True) -> tuple[int, bool]:
    """Wait for torchrun; (exit code, whether it was stopped here). When a worker has failed and torchrun is
    still running STUCK_GRACE s later (its agent waits for a rendezvous store on a node it cannot reach),
    stop it: SIGTERM, then SIGKILL after KILL_GRACE s."""
    since, forced = None, False
    while True:
        try:
            return proc.wait(timeout=0.5), forced
        except subprocess.TimeoutExpired:
            pass
        except KeyboardInterrupt:  # torchrun got the SIGINT too; wait for it to stop its workers
            continue
        if failed.is_set() and force:  # not under --max-restarts: torchrun is restarting the workers
            since = since or time.monotonic()
            waited = time.monotonic() - since
            if waited > STUCK_GRACE + KILL_GRACE:
                proc.kill()
            elif waited > STUCK_GRACE and not forced:
                forced = True
                proc.terminate()


def _peers(path: str) -> dict[str, str]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _watch_stdin(proc: subprocess.Popen, stopped: threading.Event) -> None:
    """Stop torchrun when our stdin closes (the --hostfile launcher went away or stops the job)."""
    try:  # raw fd reads: a daemon thread blocked in a buffered read would abort the interpreter at exit
        while os.read(0, 4096):
            pass
    except OSError:
        pass
    if proc.poll() is None:
        stopped.set()
        proc.send_signal(signal.SIGTERM)


def run_torchrun(argv: list[str], env_add: dict[str, str], node_rank: int, watch_stdin: bool = False,
                 port: int = 29500, max_restarts: int = 0) -> int:
    """Run torchrun in the foreground, SIGTERM/SIGHUP forwarded; on failure print which rank died first and
    which other nodes this node cannot reach (probed on ``port``; their addresses come from the ranks,
    GPTFORGE_PEERS_FILE)."""
    fd, peers_file = tempfile.mkstemp(prefix="gptforge-peers-", suffix=".json")
    os.close(fd)
    env = {**os.environ, **env_add, "GPTFORGE_PEERS_FILE": peers_file}
    tail: deque[str] = deque(maxlen=400)
    proc = subprocess.Popen(argv, env=env, stdout=None, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL if watch_stdin else None)
    stopped, failed = threading.Event(), threading.Event()
    reader = start_pump(proc.stderr, sys.stderr, tail, failed=failed, hide=SignalTraceback())
    if watch_stdin:
        threading.Thread(target=_watch_stdin, args=(proc, stopped), daemon=True).start()
    got: list[int] = []  # the stop signals this launcher received and passed on

    def forward(signum, _frame):
        got.append(signum)
        if proc.poll() is None:
            proc.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in FORWARDED}
    try:
        rc, forced = _wait(proc, failed, force=max_restarts == 0)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    reader.join(timeout=5)
    peers = _peers(peers_file)
    os.unlink(peers_file)
    if got and not stopped.is_set():
        return _stopped_by(got[0], rc, list(tail), node_rank)
    if rc != 0:
        if stopped.is_set():
            print(f"gptforge launch: node {node_rank}: stopped because the launcher closed the connection "
                  f"(another node failed)", file=sys.stderr, flush=True)
            return rc
        print(explain_failure(list(tail), node_rank, rc), file=sys.stderr, flush=True)
        if forced:
            print(f"gptforge launch: node {node_rank}: torchrun still ran {STUCK_GRACE} s after its rank failed "
                  f"(waiting for the other nodes); stopped it", file=sys.stderr, flush=True)
        lost = unreachable_peers(peers, node_rank, port) if failed.is_set() else None
        if lost:
            print(lost, file=sys.stderr, flush=True)
    return rc


def _stopped_by(signum: int, rc: int, lines: list[str], node_rank: int) -> int:
    """After a forwarded stop signal: the workers' own summary (rank 0's "stopped by ... saved checkpoint")
    and 128 + the signal's number; the job's own status when it ended anyway (0: it had finished)."""
    name = signal.Signals(signum).name
    said = [ln for ln in lines if re.search(r": stopped by SIG\w+ at step \d+, saved checkpoint ", ln)]
    if rc == 0:
        print(f"gptforge launch: node {node_rank}: got {name}; the run had already finished", file=sys.stderr)
        return 0
    if said:
        print(f"gptforge launch: node {node_rank}: {name} passed to the workers; they saved a checkpoint and "
              f"stopped; resume with --train.resume=auto (exit status {128 + signum})", file=sys.stderr, flush=True)
    else:
        print(f"gptforge launch: node {node_rank}: {name} passed to the workers; this node saw no checkpoint "
              f"saved after it (torchrun exit {rc}, see above); resume with --train.resume=auto continues from the "
              f"newest complete checkpoint", file=sys.stderr, flush=True)
    return 128 + signum


def first_failure(procs: list[subprocess.Popen]) -> tuple[int, int] | None:
    """Wait until every process ended (None) or one failed: (its index, its exit code); Ctrl-C: (-1, 130)."""
    try:
        while True:
            codes = [p.poll() for p in procs]
            for i, c in enumerate(codes):
                if c not in (None, 0):
                    return i, c
            if all(c is not None for c in codes):
                return None
            time.sleep(0.2)
    except KeyboardInterrupt:
        return -1, 130


def stop_all(procs: list[subprocess.Popen], grace: float = 20.0) -> None:
    """Close every stdin (the remote `launch --watch-stdin` stops its torchrun on EOF), then terminate."""
    for p in procs:
        if p.poll() is None and p.stdin:
            try:
                p.stdin.close()
            except OSError:
                pass
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.terminate()
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
