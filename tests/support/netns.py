"""Two "machines" on one host: two Linux network namespaces joined by a veth pair.

Reusable by every multi-node test (doctor, two-node training, Slurm, SSH hostfile).

API
---
    from support.netns import two_nodes, require_netns

    with two_nodes(rate="100mbit") as net:        # rate=None: no traffic shaping
        a, b = net.nodes                          # Node(index, ns, ip, iface, peer_ip)
        a.ns, a.ip, a.iface                       # e.g. "gf4711x0a", "10.77.0.1", "gf4711x0a"
        p = net.popen(0, ["python", "-m", "gptforge", "doctor", ...], env=..., stdout=PIPE)
        r = net.run(1, ["ip", "-br", "addr"], timeout=10)   # CompletedProcess, text output
        net.nsenter_argv(0)                       # ["nsenter", "--net=/run/netns/<ns>"] for daemons
    # on exit (also on exceptions / failed asserts): every process started with popen() is killed by
    # its process group (SIGTERM, then SIGKILL), then any process still inside the namespaces
    # (`ip netns pids`: e.g. daemons started by the test) is killed by pid, then both namespaces are
    # deleted (which deletes the veth pair and its tc qdiscs).

    # pytest: `netns_pair` is a fixture (register it with `from support.netns import netns_pair` in the
    # test module, or in a conftest); it skips cleanly when not root / no `ip` / namespaces unsupported.
    def test_x(netns_pair): ...

Layout: node i has namespace ``<prefix><pid>x<n><a|b>``, interface of the same name, address
``<subnet>.1/24`` / ``<subnet>.2/24`` (default subnet 10.77.0; namespaces are isolated, so pairs of
different tests never clash), lo up. ``rate`` adds ``tc qdisc add dev IF root tbf rate RATE burst
32kbit latency 400ms`` on both ends (netem is not in this kernel).

Processes started by ``popen``/``run`` run under ``ip netns exec NS`` (which remounts /sys: start
daemons that need cgroups, e.g. slurmd, with ``nsenter_argv`` instead). Never connect to a namespace
address from the root namespace (no route: packets would leave by the default route); run every
client inside a namespace. Namespaces left by a killed test run (their pid is dead) are deleted the
next time ``two_nodes`` is entered.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import re
import shutil
import signal
import subprocess
import time
from typing import Iterator, Sequence

PREFIX = "gf"
_counter = itertools.count()


class NetnsUnavailable(RuntimeError):
    """Namespaces cannot be used here (not root, no `ip`, kernel refuses)."""


def netns_unavailable_reason() -> str | None:
    """Why namespace tests cannot run here, or None when they can."""
    if os.name != "posix" or not hasattr(os, "geteuid"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "nsenter"):
        if shutil.which(tool) is None:
            return f"'{tool}' not found (apt-get install iproute2 util-linux)"
    return None


def require_netns() -> None:
    """pytest.skip() unless namespaces are usable."""
    import pytest

    why = netns_unavailable_reason()
    if why:
        pytest.skip(why)


@dataclasses.dataclass
class Node:
    index: int
    ns: str
    ip: str
    iface: str
    peer_ip: str


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def _ns_pids(ns: str) -> list[int]:
    r = _ip("netns", "pids", ns, check=False)
    return [int(x) for x in r.stdout.split() if x.isdigit()]


def _delete_ns(ns: str) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = _ns_pids(ns)
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and _ns_pids(ns):
            time.sleep(0.05)
    _ip("netns", "del", ns, check=False)


def cleanup_stale(prefix: str = PREFIX) -> None:
    """Delete namespaces ``<prefix><pid>x...`` whose creating process no longer exists."""
    r = _ip("netns", "list", check=False)
    for line in r.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = re.fullmatch(re.escape(prefix) + r"(\d+)x\d+[ab]", name)
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            _delete_ns(name)


class TwoNodes:
    def __init__(self, nodes: list[Node]):
        self.nodes = nodes
        self._procs: list[subprocess.Popen] = []

    def __getitem__(self, i: int) -> Node:
        return self.nodes[i]

    def exec_argv(self, i: int) -> list[str]:
        return ["ip", "netns", "exec", self.nodes[i].ns]

    def nsenter_argv(self, i: int) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{self.nodes[i].ns}"]

    def popen(self, i: int, argv: Sequence[str], *, nsenter: bool = False, **kw) -> subprocess.Popen:
        """Start ``argv`` inside node i's namespace, in a new session; tracked and killed at exit."""
        prefix = self.nsenter_argv(i) if nsenter else self.exec_argv(i)
        kw.setdefault("start_new_session", True)
        p = subprocess.Popen([*prefix, *map(str, argv)], **kw)
        self._procs.append(p)
        return p

    def run(self, i: int, argv: Sequence[str], *, timeout: float = 60, check: bool = False,
            **kw) -> subprocess.CompletedProcess:
        """Run ``argv`` inside node i's namespace to completion (text output captured by default)."""
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        p = self.popen(i, argv, stdout=subprocess.PIPE if kw.pop("capture_output") else None,
                       stderr=subprocess.PIPE, text=kw.pop("text"), **kw)
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill(p)
            out, err = p.communicate()
            raise subprocess.TimeoutExpired(p.args, timeout, out, err) from None
        r = subprocess.CompletedProcess(p.args, p.returncode, out, err)
        if check:
            r.check_returncode()
        return r

    @staticmethod
    def kill(p: subprocess.Popen, grace: float = 3.0) -> None:
        """SIGTERM the process group of ``p`` (it leads its own session), then SIGKILL."""
        if p.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, sig)
            try:
                p.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def close(self) -> None:
        for p in self._procs:
            self.kill(p)
            # the group leader may be gone while its children live on: sweep the group anyway
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
        self._procs.clear()
        for n in self.nodes:
            _delete_ns(n.ns)


@contextlib.contextmanager
def two_nodes(rate: str | None = None, subnet: str = "10.77.0", prefix: str = PREFIX) -> Iterator[TwoNodes]:
    why = netns_unavailable_reason()
    if why:
        raise NetnsUnavailable(why)
    cleanup_stale(prefix)
    base = f"{prefix}{os.getpid()}x{next(_counter)}"
    names = [base + "a", base + "b"]
    if len(names[0]) > 15:  # interface names are limited to 15 characters
        raise ValueError(f"namespace/interface name {names[0]!r} longer than 15 characters; shorten prefix")
    ips = [f"{subnet}.1", f"{subnet}.2"]
    nodes = [Node(i, names[i], ips[i], names[i], ips[1 - i]) for i in range(2)]
    net = TwoNodes(nodes)
    try:
        for n in nodes:
            r = _ip("netns", "add", n.ns, check=False)
            if r.returncode != 0:
                raise NetnsUnavailable(f"ip netns add failed: {r.stderr.strip()}")
        _ip("link", "add", names[0], "type", "veth", "peer", "name", names[1])
        for n in nodes:
            _ip("link", "set", n.iface, "netns", n.ns)
            _ip("-n", n.ns, "addr", "add", f"{n.ip}/24", "dev", n.iface)
            _ip("-n", n.ns, "link", "set", "lo", "up")
            _ip("-n", n.ns, "link", "set", n.iface, "up")
            if rate:
                subprocess.run(["ip", "netns", "exec", n.ns, "tc", "qdisc", "add", "dev", n.iface, "root",
                                "tbf", "rate", rate, "burst", "32kbit", "latency", "400ms"],
                               check=True, capture_output=True, text=True)
        yield net
    finally:
        net.close()


def _netns_pair_fixture():
    import pytest

    why = netns_unavailable_reason()
    if why:
        pytest.skip(why)
    try:
        with two_nodes() as net:
            yield net
    except NetnsUnavailable as e:  # pragma: no cover - kernel without netns support
        pytest.skip(str(e))


try:  # a pytest fixture when pytest is importable; plain helper otherwise
    import pytest as _pytest

    netns_pair = _pytest.fixture(_netns_pair_fixture)
except ImportError:  # pragma: no cover
    netns_pair = None
