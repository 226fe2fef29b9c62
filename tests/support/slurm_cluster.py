"""A real two-node Slurm cluster on one machine, for tests (Debian `slurm-wlm` + `munge`, root).

Layout (nothing outside the scratch folders and the namespaces is touched):

- two network namespaces ``gfs<pid>x<n>a`` / ``...b`` joined by a veth pair; each end is renamed to the
  same interface name (``IFACE``, like ``eth0`` on every machine of a real cluster), so one
  ``--iface`` value fits every node; addresses ``<subnet>.1`` / ``<subnet>.2``;
- a private ``munged`` (own key, socket, pid and log files in a scratch folder; run as the ``munge``
  user) started inside node 0's namespace: it never meets a system munged;
- ``slurmctld`` + ``slurmd n1`` in node 0's namespace and ``slurmd n2`` in node 1's, each started with
  ``nsenter --net`` (``ip netns exec`` remounts /sys and slurmd dies) plus ``unshare --uts --mount``:
  its own hostname (``n1``/``n2``; ``SlurmctldHost`` must equal it) and a private bind mount of a
  generated hosts file over ``/etc/hosts`` (the real ``/etc/hosts`` is never edited; the bind mount
  lives in the daemon's mount namespace only). Jobs inherit both, so ``n1``/``n2`` resolve in jobs;
- ``ProctrackType=proctrack/linuxproc``, ``TaskPlugin=task/none`` (the cgroup plugins fail every task
  launch here while ``srun`` still exits 0).

Every daemon runs in the foreground (``-D``/``-F``) as a child of the test, so the fixture knows its
pid. Teardown (also after a failed start or a failed assert): SIGTERM then SIGKILL to the pids it
started, then to whatever is left inside its two namespaces (slurmstepd, job processes), then the
namespaces are deleted and the munge scratch folder removed. Namespaces left by a killed test run
(creator pid gone) are cleaned the next time a cluster starts.

Clients (``sbatch``, ``scontrol``...) run inside node 0's namespace (``SlurmCluster.run``): never
connect to a namespace address from the root namespace (there is no route: packets would leave by
the default route).

    with slurm_cluster(tmp_path / "slurm") as c:
        job = c.sbatch(script, cwd=tmp_path)            # job id
        info = c.wait(job, timeout=150)                 # {"JobState": "COMPLETED", "ExitCode": "0:0", ...}

The pytest fixture ``slurm_two_nodes`` skips (with the reason) when not root, when namespaces are not
usable, or when slurm-wlm / munge are not installed (``apt-get install slurm-wlm munge``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, Sequence

from support.netns import _delete_ns, _ip as _ip_cmd, netns_unavailable_reason

PREFIX = "gfs"  # distinct from support.netns ("gf<digits>..."), whose stale sweep does not match ours
IFACE = "gfeth0"
MUNGE_DIR_PREFIX = "gfmunge-"
SLURM_BINARIES = ("slurmctld", "slurmd", "slurmstepd", "sbatch", "srun", "scontrol", "sinfo", "scancel")
MUNGE_BINARIES = ("munged", "munge", "unmunge")
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                   "BOOT_FAIL", "DEADLINE", "PREEMPTED", "SPECIAL_EXIT"}
_counter = itertools.count()


class SlurmUnavailable(RuntimeError):
    pass


def _which(name: str) -> str | None:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin:/usr/bin")


def slurm_unavailable_reason() -> str | None:
    """Why a local Slurm cluster cannot be started here, or None when it can."""
    why = netns_unavailable_reason()
    if why:
        return why
    missing = [b for b in SLURM_BINARIES if _which(b) is None]
    if missing:
        return f"slurm-wlm is not installed (no {', '.join(missing)}; apt-get install slurm-wlm munge)"
    missing = [b for b in MUNGE_BINARIES if _which(b) is None]
    if missing:
        return f"munge is not installed (no {', '.join(missing)}; apt-get install munge)"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "no 'munge' user (apt-get install munge)"
    for tool in ("unshare", "setpriv", "mount", "hostname"):
        if _which(tool) is None:
            return f"'{tool}' not found (apt-get install util-linux mount hostname)"
    return None


@dataclasses.dataclass
class SlurmNode:
    name: str   # Slurm node name and the daemon's hostname (n1, n2)
    ns: str     # network namespace
    ip: str


class SlurmCluster:
    def __init__(self, root: Path, nodes: list[SlurmNode], munge_dir: Path):
        self.root, self.nodes, self.munge_dir = root, nodes, munge_dir
        self.iface = IFACE
        self.conf = root / "slurm.conf"
        self.munge_socket = munge_dir / "munge.socket"
        self.log_dir = root / "log"
        self._procs: list[tuple[str, subprocess.Popen]] = []

    # -- clients -------------------------------------------------------------------------------------
    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for clients and jobs (sbatch exports it): SLURM_CONF, and this Python first on PATH."""
        env = dict(os.environ)
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", ""), "/usr/sbin", "/sbin"])
        env.update(extra or {})
        return env

    def nsenter_argv(self, i: int = 0) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{self.nodes[i].ns}"]

    def run(self, argv: Sequence[str], node: int = 0, timeout: float = 30, env: dict[str, str] | None = None,
            **kw) -> subprocess.CompletedProcess:
        """Run a client command inside node ``node``'s network namespace (text output captured)."""
        return subprocess.run([*self.nsenter_argv(node), *map(str, argv)], capture_output=True, text=True,
                              timeout=timeout, env=env or self.env(), **kw)

    def sbatch(self, script: Path, cwd: Path | None = None, env: dict[str, str] | None = None) -> int:
        r = self.run(["sbatch", "--parsable", str(script)], cwd=cwd, env=env)
        if r.returncode != 0:
            raise RuntimeError(f"sbatch failed ({r.returncode}): {r.stderr.strip()}\n{self.logs()}")
        return int(r.stdout.strip().split(";")[0])

    def job_info(self, job_id: int) -> dict[str, str]:
        r = self.run(["scontrol", "show", "job", "-o", str(job_id)])
        if r.returncode != 0:
            return {}
        return dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", r.stdout))

    def wait(self, job_id: int, timeout: float) -> dict[str, str]:
        """Wait until the job ends; cancel it and raise TimeoutError (with the logs) after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job_info(job_id) or info
            if info.get("JobState") in TERMINAL_STATES:
                return info
            time.sleep(1)
        self.run(["scancel", str(job_id)])
        raise TimeoutError(f"job {job_id} did not finish in {timeout:.0f} s (last state {info.get('JobState')}); "
                           f"cancelled\n{self.logs()}")

    def logs(self, tail: int = 40) -> str:
        """The last lines of every daemon log, for failure messages."""
        out = []
        for f in sorted(self.log_dir.glob("*.log")) + sorted(self.munge_dir.glob("*.log")):
            with contextlib.suppress(OSError):
                lines = f.read_text(errors="replace").splitlines()[-tail:]
                out.append(f"--- {f.name}\n" + "\n".join(lines))
        return "\n".join(out)

    # -- daemons -------------------------------------------------------------------------------------
    def _start(self, label: str, argv: list[str]) -> subprocess.Popen:
        logf = open(self.log_dir / f"{label}.stdout.log", "ab")
        try:
            p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                 start_new_session=True, env=self.env())
        finally:
            logf.close()
        self._procs.append((label, p))
        return p

    def _in_node(self, i: int, argv: list[str]) -> list[str]:
        """argv run in node i's netns, with its own hostname and /etc/hosts (private UTS + mount ns).
        nsenter and unshare exec (no fork), so the Popen pid is the daemon's pid."""
        n = self.nodes[i]
        return [*self.nsenter_argv(i), "unshare", "--uts", "--mount", "--propagation", "private",
                "sh", "-c", 'hostname "$1" && mount --bind "$2" /etc/hosts && shift 2 && exec "$@"',
                "sh", n.name, str(self.root / "hosts"), *argv]

    def _check_alive(self) -> None:
        dead = [(label, p.returncode) for label, p in self._procs if p.poll() is not None]
        if dead:
            raise SlurmUnavailable(f"daemon(s) exited at start: {dead}\n{self.logs()}")

    def start(self, cpus: int) -> None:
        for d in ("state", "spool", "log"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        for n in self.nodes:
            (self.root / "spool" / n.name).mkdir(exist_ok=True)
        self._start_munge()
        names = " ".join(n.name for n in self.nodes)
        (self.root / "hosts").write_text("127.0.0.1 localhost\n" + "".join(f"{n.ip} {n.name}\n" for n in self.nodes))
        r, c0 = self.root, self.nodes[0]
        self.conf.write_text(f"""\
ClusterName=gftest
SlurmctldHost={c0.name}({c0.ip})
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
SlurmUser=root
SlurmdUser=root
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
InactiveLimit=0
KillWait=5
MinJobAge=600
""" + "".join(f"NodeName={n.name} NodeAddr={n.ip} CPUs={cpus} State=UNKNOWN\n" for n in self.nodes)
            + f"PartitionName=debug Nodes={','.join(n.name for n in self.nodes)} Default=YES MaxTime=INFINITE State=UP\n")
        self._start("slurmctld", self._in_node(0, ["slurmctld", "-D", "-f", str(self.conf)]))
        for i, n in enumerate(self.nodes):
            self._start(f"slurmd.{n.name}", self._in_node(i, ["slurmd", "-D", "-f", str(self.conf), "-N", n.name]))
        deadline = time.monotonic() + 40
        states = ""
        while time.monotonic() < deadline:
            self._check_alive()
            r_ = self.run(["sinfo", "-h", "-N", "-o", "%N %T"], timeout=10)
            states = r_.stdout.strip()
            got = dict(line.split() for line in states.splitlines() if len(line.split()) == 2)
            if all(got.get(n.name) == "idle" for n in self.nodes):
                return
            time.sleep(0.5)
        raise SlurmUnavailable(f"nodes {names} not idle after 40 s (sinfo: {states!r})\n{self.logs()}")

    def _start_munge(self) -> None:
        m = self.munge_dir
        key = m / "munge.key"
        key.write_bytes(os.urandom(1024))
        pw = pwd.getpwnam("munge")
        for p in (m, key):
            os.chown(p, pw.pw_uid, pw.pw_gid)
        key.chmod(0o400)
        m.chmod(0o755)
        # setpriv execs munged directly (runuser would stay as a parent): the Popen pid is munged's
        self._start("munged", [*self.nsenter_argv(0), "setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}",
                               "--clear-groups", _which("munged") or "munged", "-F", f"--key-file={key}",
                               f"--socket={self.munge_socket}", f"--pid-file={m}/munged.pid",
                               f"--log-file={m}/munged.log", f"--seed-file={m}/munged.seed"])
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            self._check_alive()
            r = subprocess.run(f"munge -n --socket={self.munge_socket} | unmunge --socket={self.munge_socket}",
                               shell=True, capture_output=True, text=True)
            if r.returncode == 0:
                return
            time.sleep(0.2)
        raise SlurmUnavailable(f"munged does not answer: {r.stderr.strip()}\n{self.logs()}")

    def close(self) -> None:
        """Kill the daemons this cluster started (by pid), then anything left in its namespaces."""
        for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            alive = [p for _, p in self._procs if p.poll() is None]
            for p in alive:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(sig)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and any(p.poll() is None for p in alive):
                time.sleep(0.05)
        for _, p in self._procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=1)
        self._procs.clear()
        for n in self.nodes:  # slurmstepd and job processes: forked by our slurmd, inside our namespaces
            _delete_ns(n.ns)


def _pid_alive(pid: int) -> bool:
    """True when the process exists and is not a zombie (a killed test can linger as one)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def cleanup_stale() -> None:
    """Namespaces (and the daemons and jobs inside them) and munge folders of killed earlier runs."""
    for line in _ip_cmd("netns", "list", check=False).stdout.splitlines():
        name = (line.split() or [""])[0]
        m = re.fullmatch(PREFIX + r"(\d+)x\d+[ab]", name)
        if m and not _pid_alive(int(m.group(1))):
            _delete_ns(name)
    for d in Path(tempfile.gettempdir()).glob(MUNGE_DIR_PREFIX + "*"):
        m = re.fullmatch(re.escape(MUNGE_DIR_PREFIX) + r"(\d+)-.*", d.name)
        if m and not _pid_alive(int(m.group(1))):
            shutil.rmtree(d, ignore_errors=True)


def _ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise SlurmUnavailable(f"ip {' '.join(args)}: {r.stderr.strip()}")


@contextlib.contextmanager
def slurm_cluster(root: Path, subnet: str = "10.77.3", cpus: int = 1,
                  names: Sequence[str] = ("n1", "n2")) -> Iterator[SlurmCluster]:
    """Start munged + slurmctld + one slurmd per node (two namespaces); tear all of it down on exit."""
    why = slurm_unavailable_reason()
    if why:
        raise SlurmUnavailable(why)
    cleanup_stale()
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    base = f"{PREFIX}{os.getpid()}x{next(_counter)}"
    nodes = [SlurmNode(names[i], base + "ab"[i], f"{subnet}.{i + 1}") for i in range(2)]
    # munged (user munge) must reach its folder: not under pytest's root-only (0700) tmp tree
    munge_dir = Path(tempfile.mkdtemp(prefix=f"{MUNGE_DIR_PREFIX}{os.getpid()}-"))
    cluster = SlurmCluster(root, nodes, munge_dir)
    created: list[str] = []
    try:
        for n in nodes:
            _ip("netns", "add", n.ns)
            created.append(n.ns)
        _ip("link", "add", nodes[0].ns, "type", "veth", "peer", "name", nodes[1].ns)
        for n in nodes:
            _ip("link", "set", n.ns, "netns", n.ns)
            _ip("-n", n.ns, "link", "set", "dev", n.ns, "name", IFACE)  # same name on every node
            _ip("-n", n.ns, "addr", "add", f"{n.ip}/24", "dev", IFACE)
            _ip("-n", n.ns, "link", "set", "lo", "up")
            _ip("-n", n.ns, "link", "set", IFACE, "up")
        cluster.start(cpus)
        yield cluster
    finally:
        cluster.close()
        for ns in created:
            _delete_ns(ns)
        with contextlib.suppress(Exception):  # a veth left in the root ns if the move failed
            subprocess.run(["ip", "link", "del", nodes[0].ns], capture_output=True)
        shutil.rmtree(munge_dir, ignore_errors=True)


def _slurm_two_nodes_fixture(tmp_path):
    import pytest

    why = slurm_unavailable_reason()
    if why:
        pytest.skip(why)
    with slurm_cluster(tmp_path / "slurm") as cluster:
        yield cluster


try:
    import pytest as _pytest

    slurm_two_nodes = _pytest.fixture(_slurm_two_nodes_fixture)
except ImportError:  # pragma: no cover
    slurm_two_nodes = None
