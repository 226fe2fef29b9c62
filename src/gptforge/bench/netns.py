"""Two "nodes" on this machine for `gptforge bench --nodes 2`: two Linux network namespaces joined by a
veth pair, the link rate-limited by ``tc qdisc add dev IF root tbf rate RATE burst 32kbit latency 400ms``
on both ends.

    with NodePair(rate="100mbit") as net:
        p = net.popen(0, argv, cwd=..., env=..., stdout=log)   # inside node 0's namespace, own session
    # on exit (also on Ctrl-C, SIGTERM and errors): every process started here is killed by its process
    # group (SIGTERM, then SIGKILL), then any process left inside the namespaces by pid, then both
    # namespaces are deleted (with the veth pair and its qdiscs).

Node i has namespace and interface ``gfb<pid>n<i>``, address ``10.79.0.<i+1>/24``. Namespaces left by a
killed bench (their pid is gone) are deleted when the next one starts. Needs root and `ip`/`tc`."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass

from gptforge.errors import UserError

PREFIX = "gfb"
SUBNET = "10.79.0"


@dataclass
class Node:
    index: int
    ns: str
    ip: str
    iface: str


def unavailable_reason() -> str | None:
    if os.name != "posix" or not hasattr(os, "geteuid"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root (run as root, e.g. in a container)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"'{tool}' not found (apt-get install iproute2)"
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise UserError(f"'ip {' '.join(args)}' failed: {r.stderr.strip() or r.returncode}")
    return r


def _kill_namespace(ns: str) -> None:
    """Kill what still runs inside ``ns`` (by pid), then delete it."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = [int(x) for x in _ip("netns", "pids", ns, check=False).stdout.split() if x.isdigit()]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 3
        while pids and time.monotonic() < deadline and _ip("netns", "pids", ns, check=False).stdout.strip():
            time.sleep(0.05)
    _ip("netns", "del", ns, check=False)


def _cleanup_stale() -> None:
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = re.fullmatch(PREFIX + r"(\d+)n[01]", name)
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            _kill_namespace(name)


def _kill_group(p: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM the process group of ``p`` (it leads its own session), then SIGKILL the group."""
    if p.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(p.pid, signal.SIGKILL)  # the leader may be gone while its children live on
    with contextlib.suppress(subprocess.TimeoutExpired):
        p.wait(timeout=5)


def _sigterm(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


class NodePair:
    def __init__(self, rate: str | None = None):
        why = unavailable_reason()
        if why:
            raise UserError(f"bench --nodes 2 starts two network namespaces: {why}")
        self.rate = rate
        self.nodes = [Node(i, f"{PREFIX}{os.getpid()}n{i}", f"{SUBNET}.{i + 1}", f"{PREFIX}{os.getpid()}n{i}")
                      for i in (0, 1)]
        self._procs: list[subprocess.Popen] = []
        self._old_term = None

    def __enter__(self) -> "NodePair":
        self._old_term = signal.signal(signal.SIGTERM, _sigterm)
        try:
            _cleanup_stale()
            for n in self.nodes:
                _ip("netns", "add", n.ns)
            _ip("link", "add", self.nodes[0].iface, "type", "veth", "peer", "name", self.nodes[1].iface)
            for n in self.nodes:
                _ip("link", "set", n.iface, "netns", n.ns)
                _ip("-n", n.ns, "addr", "add", f"{n.ip}/24", "dev", n.iface)
                _ip("-n", n.ns, "link", "set", "lo", "up")
                _ip("-n", n.ns, "link", "set", n.iface, "up")
                if self.rate:
                    r = subprocess.run(["ip", "netns", "exec", n.ns, "tc", "qdisc", "add", "dev", n.iface, "root",
                                        "tbf", "rate", self.rate, "burst", "32kbit", "latency", "400ms"],
                                       capture_output=True, text=True)
                    if r.returncode != 0:
                        raise UserError(f"--rate {self.rate}: tc refused it: {r.stderr.strip()}")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def popen(self, i: int, argv: list[str], **kw) -> subprocess.Popen:
        """Start ``argv`` inside node i's namespace, in a new session (killed by group at exit)."""
        p = subprocess.Popen(["ip", "netns", "exec", self.nodes[i].ns, *map(str, argv)], start_new_session=True, **kw)
        self._procs.append(p)
        return p

    def stop(self, p: subprocess.Popen) -> None:
        _kill_group(p)

    def close(self) -> None:
        for p in self._procs:
            _kill_group(p)
        self._procs.clear()
        for n in self.nodes:
            _kill_namespace(n.ns)
        if self._old_term is not None:
            signal.signal(signal.SIGTERM, self._old_term)
            self._old_term = None
