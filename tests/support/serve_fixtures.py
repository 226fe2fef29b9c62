"""A real `gptforge serve` in a subprocess on 127.0.0.1 (a free port), killed by PID at the end."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

API_KEY = "sk-test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float = 5) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


@contextlib.contextmanager
def running_server(checkpoint: Path, log: Path, *extra: str, timeout: float = 90, env: dict | None = None):
    """Yields the base URL (http://127.0.0.1:PORT) once /health answers; stops the server by PID after.
    env: variables added to this process's environment for the server."""
    port = free_port()
    cmd = [sys.executable, "-m", "gptforge", "serve", "--checkpoint", str(checkpoint), "--port", str(port), *extra]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **env} if env else None)
    url = f"http://127.0.0.1:{port}"
    try:
        t0 = time.monotonic()
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"server exited with {proc.returncode}: {log.read_text()[-2000:]}")
            try:
                get_json(url + "/health", timeout=1)
                break
            except OSError:
                if time.monotonic() - t0 > timeout:
                    raise AssertionError(f"server did not answer /health: {log.read_text()[-2000:]}")
                time.sleep(0.2)
        yield url, proc
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGINT)  # Ctrl-C: uvicorn stops cleanly
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
