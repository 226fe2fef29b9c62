"""`gptforge launch --hostfile`: start `gptforge launch` on every host over ssh, node 0 = the first host,
prefix each host's output with its name, and stop every node when one fails."""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import socket
import subprocess
import sys

from gptforge.errors import UserError
from gptforge.launch.options import LaunchOptions
from gptforge.launch.process import first_failure, start_pump, stop_all

FORWARD_ENV_PREFIXES = ("NCCL_", "GLOO_", "GPTFORGE_", "HSA_", "HIP_", "TORCH_", "HF_", "PYTORCH_")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclasses.dataclass
class Host:
    target: str  # what ssh connects to ([user@]host)
    addr: str  # host part, the address other nodes use
    slots: int | None = None
    iface: str | None = None


def parse_hostfile(path: str) -> list[Host]:
    try:
        text = open(path).read()
    except OSError as e:
        raise UserError(f"cannot read hostfile {path}: {e.strerror}") from None
    hosts = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        h = Host(parts[0], parts[0].rsplit("@", 1)[-1])
        for kv in parts[1:]:
            k, _, v = kv.partition("=")
            if k == "slots" and v.isdigit() and int(v) > 0:
                h.slots = int(v)
            elif k == "iface" and v:
                h.iface = v
            else:
                raise UserError(f"{path}:{n}: cannot read '{kv}': lines are 'host [slots=N] [iface=IF]'")
        hosts.append(h)
    if not hosts:
        raise UserError(f"hostfile {path} lists no hosts: one line per node, 'host [slots=N] [iface=IF]'")
    return hosts


def _is_ip(s: str) -> bool:
    try:
        socket.inet_aton(s)
        return s.count(".") == 3
    except OSError:
        return False


def node_launch_args(opts: LaunchOptions, hosts: list[Host], i: int) -> list[str]:
    """The `gptforge launch` flags host ``i`` runs with (its rank, slots and interface)."""
    h = hosts[i]
    la = ["--nnodes", str(len(hosts)), "--node-rank", str(i), "--master-addr", opts.master_addr or hosts[0].addr,
          "--master-port", str(opts.master_port), "--rdzv-timeout", str(opts.rdzv_timeout), "--rdzv-id", opts.rdzv_id]
    if h.slots or opts.nproc_per_node:
        la += ["--nproc-per-node", str(h.slots or opts.nproc_per_node)]
    iface = h.iface or opts.iface
    if iface:
        la += ["--iface", iface]
    elif _is_ip(h.addr):
        la += ["--local-addr", h.addr]
    if opts.no_ib:
        la.append("--no-ib")
    if opts.collective_timeout is not None:
        la += ["--collective-timeout", str(opts.collective_timeout)]
    if opts.max_restarts:
        la += ["--max-restarts", str(opts.max_restarts)]
    return [*la, "--watch-stdin"]


def forwarded_env() -> dict[str, str]:
    """The variables every host gets (by prefix); a name that is not a shell identifier is refused, since the
    remote side reads the command through a shell."""
    fwd = {k: v for k, v in os.environ.items() if k.startswith(FORWARD_ENV_PREFIXES)}
    for k in fwd:
        if not _ENV_NAME.fullmatch(k):
            raise UserError(f"environment variable name {k[:80]!r} is not [A-Za-z_][A-Za-z0-9_]* and would be "
                            "forwarded to every host: unset it before `launch --hostfile`")
    return fwd


def hostfile_commands(opts: LaunchOptions, hosts: list[Host]) -> list[list[str]]:
    """The ssh argv for every host: `cd CWD && env ... python -m gptforge launch ... --node-rank=i ...`."""
    python = opts.remote_python or sys.executable
    cwd = opts.remote_cwd or os.getcwd()
    envs = " ".join(shlex.quote(f"{k}={v}") for k, v in sorted(forwarded_env().items()))
    ssh = ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10"]
    if opts.ssh_config:
        ssh += ["-F", opts.ssh_config]
    for o in opts.ssh_option:
        ssh += ["-o", o]
    out = []
    for i, h in enumerate(hosts):
        remote = (f"cd {shlex.quote(cwd)} && " + (f"env {envs} " if envs else "") +
                  shlex.join([python, "-m", "gptforge", "launch", *node_launch_args(opts, hosts, i), "--",
                              *opts.command]))
        out.append([*ssh, h.target, remote])
    return out


def run_hostfile(opts: LaunchOptions) -> int:
    hosts = parse_hostfile(opts.hostfile)
    cmds = hostfile_commands(opts, hosts)
    if opts.dry_run:
        for i, (h, c) in enumerate(zip(hosts, cmds)):
            print(f"# node {i}: {h.target}")
            print(shlex.join(c))
        return 0
    width = max(len(h.target) for h in hosts)
    procs: list[subprocess.Popen] = []
    pumps = []
    for h, c in zip(hosts, cmds):
        p = subprocess.Popen(c, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        procs.append(p)
        pre = f"[{h.target:<{width}}] "
        pumps += [start_pump(p.stdout, sys.stdout, None, pre), start_pump(p.stderr, sys.stderr, None, pre)]
    failed = first_failure(procs)
    if failed:
        stop_all(procs)
    for t in pumps:
        t.join(timeout=5)
    if not failed:
        return 0
    i, c = failed
    if i >= 0:
        why = ("ssh could not connect or run the command: check `ssh -o BatchMode=yes "
               f"{hosts[i].target} true` works (keys, known_hosts)") if c == 255 else "see its output above"
        print(f"gptforge launch: host {hosts[i].target} (node {i}) failed with exit code {c}; {why}; "
              f"stopped the other nodes", file=sys.stderr, flush=True)
    return c
