"""Running child processes for `gptforge launch`: copy their output line by line, forward signals, stop
torchrun when the hostfile launcher goes away, and stop a group of remote nodes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from typing import IO

from gptforge.launch.failures import explain_failure


def pump(src: IO[bytes], dst: IO[str], keep: deque | None, prefix: str = "") -> None:
    """Copy ``src`` to ``dst`` a line at a time (with ``prefix``), keeping the lines in ``keep``."""
    for raw in iter(src.readline, b""):
        line = raw.decode(errors="replace")
        try:
            dst.write(prefix + line)
            dst.flush()
        except (BrokenPipeError, ValueError):
            pass
        if keep is not None:
            keep.append(line.rstrip("\n"))
    src.close()


def start_pump(src: IO[bytes], dst: IO[str], keep: deque | None = None, prefix: str = "") -> threading.Thread:
    t = threading.Thread(target=pump, args=(src, dst, keep, prefix), daemon=True)
    t.start()
    return t


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


def run_torchrun(argv: list[str], env_add: dict[str, str], node_rank: int, watch_stdin: bool = False) -> int:
    """Run torchrun in the foreground, SIGTERM/SIGHUP forwarded; on failure print which rank died first."""
    env = {**os.environ, **env_add}
    tail: deque[str] = deque(maxlen=400)
    proc = subprocess.Popen(argv, env=env, stdout=None, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL if watch_stdin else None)
    stopped = threading.Event()
    reader = start_pump(proc.stderr, sys.stderr, tail)
    if watch_stdin:
        threading.Thread(target=_watch_stdin, args=(proc, stopped), daemon=True).start()

    def forward(signum, _frame):
        if proc.poll() is None:
            proc.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        while True:
            try:
                rc = proc.wait()
                break
            except KeyboardInterrupt:  # torchrun got the SIGINT too; wait for it to stop its workers
                continue
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    reader.join(timeout=5)
    if rc != 0:
        if stopped.is_set():
            print(f"gptforge launch: node {node_rank}: stopped because the launcher closed the connection "
                  f"(another node failed)", file=sys.stderr, flush=True)
        else:
            print(explain_failure(list(tail), node_rank, rc), file=sys.stderr, flush=True)
    return rc


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
