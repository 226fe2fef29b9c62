"""`gptforge launch`: build and run the torchrun command for this node (or, with --hostfile, for all nodes).

    gptforge launch --nnodes 2 --node-rank 0 --master-addr 10.0.0.1 --iface eth0 -- pretrain --config c.toml
    gptforge launch --nnodes 2 --node-rank 1 --master-addr 10.0.0.1 --iface eth0 -- pretrain --config c.toml
    gptforge launch --hostfile hosts.txt -- pretrain --config c.toml      # every host over ssh
    gptforge launch ... --dry-run      # print the environment and the command, copy-pasteable

The command after ``--`` is a gptforge command (``pretrain ...`` -> ``-m gptforge pretrain ...``), a
script (``examples/tp_dp_mlp.py ...``) or a module (``-m pkg.mod ...``).

Multi-node runs use torchrun's c10d rendezvous hosted by node 0 (``--rdzv-conf=is_host=1``) on
``--master-addr:--master-port``; nodes may start up to ``--rdzv-timeout`` seconds apart. Global ranks
are assigned by the rendezvous (ordered by node address), so ``--node-rank`` picks the node that hosts
the rendezvous, not the ranks' order. ``--max-restarts=0``: a rank that dies ends the job. The agent
on its node stops its other workers at once; the ranks on other nodes see their peer's sockets close
and fail within ``GPTFORGE_COLLECTIVE_TIMEOUT_S`` (default 30 s, read by the trainer as the
collective timeout) when a whole machine disappears. The launcher then prints which rank on which
node failed first.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from typing import IO, Sequence

from gptforge.errors import UserError

DEFAULT_PORT = 29500
DEFAULT_RDZV_TIMEOUT = 600
DEFAULT_COLLECTIVE_TIMEOUT = 30
SHUTDOWN_TIMEOUT = 10  # seconds torchrun waits after SIGTERM before SIGKILL-ing workers
FORWARD_ENV_PREFIXES = ("NCCL_", "GLOO_", "GPTFORGE_", "HSA_", "HIP_", "TORCH_", "HF_", "PYTORCH_")


# ----------------------------------------------------------------------------------------------------
# argument parsing


def _add_node_flags(p: argparse.ArgumentParser) -> None:
    """Flags shared with `gptforge doctor`."""
    p.add_argument("--nnodes", type=int, default=1, help="number of nodes (default 1)")
    p.add_argument("--node-rank", type=int, default=0, help="this node's rank, 0..nnodes-1; node 0 hosts the rendezvous")
    p.add_argument("--master-addr", default=None,
                   help="address of node 0 on the network the nodes share (default: 127.0.0.1 on one node)")
    p.add_argument("--master-port", type=int, default=DEFAULT_PORT, help=f"rendezvous port on node 0 (default {DEFAULT_PORT})")
    p.add_argument("--iface", default=None,
                   help="network interface the nodes talk over (sets NCCL_SOCKET_IFNAME and GLOO_SOCKET_IFNAME)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gptforge launch",
        description="Build and run the torchrun command for this node. Put the training command after --.",
        epilog="example: gptforge launch --nnodes 2 --node-rank 0 --master-addr 10.0.0.1 --iface eth0 -- "
               "pretrain --config configs/small.toml",
    )
    p.add_argument("--nproc-per-node", type=int, default=None,
                   help="processes on this node (default: number of GPUs, 1 on CPU)")
    _add_node_flags(p)
    p.add_argument("--no-ib", action="store_true", help="disable InfiniBand in NCCL (NCCL_IB_DISABLE=1): plain Ethernet")
    p.add_argument("--rdzv-timeout", type=int, default=DEFAULT_RDZV_TIMEOUT,
                   help=f"seconds to wait for all nodes to join (default {DEFAULT_RDZV_TIMEOUT})")
    p.add_argument("--rdzv-id", default="gptforge", help="job id, the same on every node (default gptforge)")
    p.add_argument("--local-addr", default=None,
                   help="this node's address as the others reach it (default: the address of --iface)")
    p.add_argument("--collective-timeout", type=int, default=None,
                   help=f"seconds a collective may wait for a dead peer before the job ends "
                        f"(GPTFORGE_COLLECTIVE_TIMEOUT_S, default {DEFAULT_COLLECTIVE_TIMEOUT})")
    p.add_argument("--dry-run", action="store_true", help="print the environment and command (one per line) and exit")
    p.add_argument("--check", action="store_true", help="run `gptforge doctor` with the same node flags first")
    p.add_argument("--wait", type=int, default=120, help="with --check: seconds doctor waits for the other nodes")
    p.add_argument("--hostfile", default=None,
                   help="file of lines 'host [slots=N] [iface=IF]': start every node over ssh, node 0 = first host")
    p.add_argument("--ssh-option", "-o", action="append", default=[], metavar="OPT",
                   help="extra ssh -o option for --hostfile (repeatable), e.g. -o Port=2222")
    p.add_argument("--ssh-config", default=None, help="ssh -F config file for --hostfile")
    p.add_argument("--remote-python", default=None,
                   help="python on the remote hosts for --hostfile (default: this one, same path)")
    p.add_argument("--remote-cwd", default=None, help="working directory on the remote hosts (default: this one)")
    p.add_argument("--watch-stdin", action="store_true", help=argparse.SUPPRESS)  # used by --hostfile
    return p


def split_command(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    argv = list(argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    own, cmd = split_command(argv)
    args = build_parser().parse_args(own)
    return args, cmd


def validate(args: argparse.Namespace, cmd: list[str]) -> None:
    if not cmd:
        raise UserError("no command to launch: put it after --, e.g. `gptforge launch --nnodes 2 ... -- pretrain "
                        "--config configs/small.toml`")
    if args.hostfile:
        return
    if args.nnodes < 1:
        raise UserError(f"--nnodes must be >= 1, got {args.nnodes}")
    if not 0 <= args.node_rank < args.nnodes:
        raise UserError(f"--node-rank {args.node_rank} is out of range for --nnodes {args.nnodes}: "
                        f"use 0..{args.nnodes - 1} (node 0 hosts the rendezvous)")
    if args.nproc_per_node is not None and args.nproc_per_node < 1:
        raise UserError(f"--nproc-per-node must be >= 1, got {args.nproc_per_node}")
    if args.nnodes > 1 and not args.master_addr:
        raise UserError("--master-addr is required with --nnodes > 1: give node 0's address on the network the "
                        "nodes share (the same value on every node)")
    if not 0 < args.master_port < 65536:
        raise UserError(f"--master-port must be 1..65535, got {args.master_port}")
    if args.iface:
        from gptforge.launch import netutil

        netutil.require_iface(args.iface)


# ----------------------------------------------------------------------------------------------------
# building the command


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()  # NVML / HIP query, creates no CUDA context
    except Exception:
        return 0


def default_nproc() -> int:
    return max(1, _gpu_count())


def _rocm_env(env: dict[str, str]) -> None:
    """HSA override for consumer RDNA cards, detected without creating a GPU context (KFD topology)."""
    try:
        import torch

        if getattr(torch.version, "hip", None) is None:
            return
    except Exception:
        return
    from gptforge import hardware

    arch = hardware.rocm_arch_from_kfd()
    if arch and not os.environ.get("HSA_OVERRIDE_GFX_VERSION"):
        val = hardware.hsa_override(arch)
        if val:
            env["HSA_OVERRIDE_GFX_VERSION"] = val


def target_argv(cmd: list[str]) -> list[str]:
    """`pretrain ...` -> `-m gptforge pretrain ...`; `x.py ...` -> `x.py ...`; `-m mod ...` kept."""
    if cmd[0] == "-m":
        if len(cmd) < 2:
            raise UserError("`-m` after -- needs a module name")
        return cmd
    if cmd[0].endswith(".py"):
        if not os.path.exists(cmd[0]):
            raise UserError(f"script {cmd[0]} not found (relative to {os.getcwd()})")
        return cmd
    if cmd[0] in ("gptforge", "python", sys.executable):
        raise UserError(f"give the gptforge command itself after --, e.g. `-- pretrain ...`, not `-- {cmd[0]} ...`")
    return ["-m", "gptforge", *cmd]


@dataclasses.dataclass
class Plan:
    argv: list[str]
    env: dict[str, str]  # additions to the environment
    node_rank: int
    nnodes: int
    local_addr: str | None


def build_plan(args: argparse.Namespace, cmd: list[str]) -> Plan:
    env: dict[str, str] = {}
    if args.iface:
        env["NCCL_SOCKET_IFNAME"] = args.iface
        env["GLOO_SOCKET_IFNAME"] = args.iface
    if args.no_ib:
        env["NCCL_IB_DISABLE"] = "1"
    if args.collective_timeout is not None:
        env["GPTFORGE_COLLECTIVE_TIMEOUT_S"] = str(args.collective_timeout)
    elif not os.environ.get("GPTFORGE_COLLECTIVE_TIMEOUT_S"):
        env["GPTFORGE_COLLECTIVE_TIMEOUT_S"] = str(DEFAULT_COLLECTIVE_TIMEOUT)
    env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(SHUTDOWN_TIMEOUT)))
    env["GPTFORGE_NODE_RANK"] = str(args.node_rank)
    env["GPTFORGE_NNODES"] = str(args.nnodes)
    nproc = args.nproc_per_node or default_nproc()
    if not os.environ.get("OMP_NUM_THREADS") and _gpu_count() == 0:
        # torchrun would give each process 1 thread; on CPU give each its share of the cores
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    _rocm_env(env)

    run = [sys.executable, "-m", "torch.distributed.run"]
    local_addr = args.local_addr
    if args.nnodes == 1:
        run += ["--standalone", "--nnodes=1", f"--nproc-per-node={nproc}"]
    else:
        if not local_addr and args.iface:
            from gptforge.launch import netutil

            local_addr = netutil.require_iface(args.iface)
        conf = [f"is_host={1 if args.node_rank == 0 else 0}", f"join_timeout={args.rdzv_timeout}"]
        # no --node-rank: the c10d rendezvous ignores it (and warns); GPTFORGE_NODE_RANK carries it
        run += [f"--nnodes={args.nnodes}", f"--nproc-per-node={nproc}", "--rdzv-backend=c10d", f"--rdzv-endpoint={args.master_addr}:{args.master_port}",
                f"--rdzv-id={args.rdzv_id}", f"--rdzv-conf={','.join(conf)}"]
        if local_addr:
            run.append(f"--local-addr={local_addr}")
    run += ["--max-restarts=0", *target_argv(cmd)]
    return Plan(run, env, args.node_rank, args.nnodes, local_addr)


def format_dry_run(plan: Plan) -> str:
    lines = [f"export {k}={shlex.quote(v)}" for k, v in plan.env.items()]
    argv = [shlex.quote(a) for a in plan.argv]
    # one argument (or flag=value) per line, joined with shell continuations
    body, i = [], 0
    first = " ".join(argv[:3])  # python -m torch.distributed.run
    rest = argv[3:]
    while i < len(rest):
        if rest[i] == "-m" and i + 1 < len(rest):
            body.append(" ".join(rest[i:]))  # the target command stays on one line
            break
        if rest[i].endswith(".py"):
            body.append(" ".join(rest[i:]))
            break
        body.append(rest[i])
        i += 1
    lines.append(" \\\n  ".join([first, *body]))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# running torchrun and explaining its failures

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


def explain_failure(lines: Sequence[str], node_rank: int, rc: int) -> str:
    f = parse_failure(lines)
    text = "\n".join(lines[-200:])
    where = f"node {node_rank} ({socket.gethostname()})"
    if f is None:
        if "RendezvousTimeoutError" in text or "RendezvousClosedError" in text or "RendezvousConnectionError" in text:
            return (f"gptforge launch: {where}: the rendezvous failed (exit {rc}): not all nodes joined or the "
                    f"rendezvous host is unreachable; run `gptforge doctor` with the same flags on every node")
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


def _pump(src: IO[bytes], dst: IO[str], keep: deque | None, prefix: str = "") -> None:
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


def run_plan(plan: Plan, watch_stdin: bool = False) -> int:
    env = {**os.environ, **plan.env}
    tail: deque[str] = deque(maxlen=400)
    proc = subprocess.Popen(plan.argv, env=env, stdout=None, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL if watch_stdin else None)
    stopped = threading.Event()
    pump = threading.Thread(target=_pump, args=(proc.stderr, sys.stderr, tail), daemon=True)
    pump.start()
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
    pump.join(timeout=5)
    if rc != 0:
        if stopped.is_set():
            print(f"gptforge launch: node {plan.node_rank}: stopped because the launcher closed the connection "
                  f"(another node failed)", file=sys.stderr, flush=True)
        else:
            print(explain_failure(list(tail), plan.node_rank, rc), file=sys.stderr, flush=True)
    return rc


# ----------------------------------------------------------------------------------------------------
# --hostfile: every node over ssh


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


def hostfile_commands(args: argparse.Namespace, cmd: list[str], hosts: list[Host]) -> list[list[str]]:
    """The ssh argv for every host: `cd CWD && env ... exec python -m gptforge launch ... --node-rank=i ...`."""
    python = args.remote_python or sys.executable
    cwd = args.remote_cwd or os.getcwd()
    master = args.master_addr or hosts[0].addr
    fwd = {k: v for k, v in os.environ.items() if k.startswith(FORWARD_ENV_PREFIXES)}
    ssh = ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10"]
    if args.ssh_config:
        ssh += ["-F", args.ssh_config]
    for o in args.ssh_option:
        ssh += ["-o", o]
    out = []
    for i, h in enumerate(hosts):
        la = ["--nnodes", str(len(hosts)), "--node-rank", str(i), "--master-addr", master,
              "--master-port", str(args.master_port), "--rdzv-timeout", str(args.rdzv_timeout),
              "--rdzv-id", args.rdzv_id]
        if h.slots or args.nproc_per_node:
            la += ["--nproc-per-node", str(h.slots or args.nproc_per_node)]
        iface = h.iface or args.iface
        if iface:
            la += ["--iface", iface]
        elif _is_ip(h.addr):
            la += ["--local-addr", h.addr]
        if args.no_ib:
            la.append("--no-ib")
        if args.collective_timeout is not None:
            la += ["--collective-timeout", str(args.collective_timeout)]
        la.append("--watch-stdin")
        envs = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(fwd.items()))
        remote = (f"cd {shlex.quote(cwd)} && " + (f"env {envs} " if envs else "") +
                  shlex.join([python, "-m", "gptforge", "launch", *la, "--", *cmd]))
        out.append([*ssh, h.target, remote])
    return out


def run_hostfile(args: argparse.Namespace, cmd: list[str]) -> int:
    hosts = parse_hostfile(args.hostfile)
    cmds = hostfile_commands(args, cmd, hosts)
    if args.dry_run:
        for h, c in zip(hosts, cmds):
            print(f"# node {hosts.index(h)}: {h.target}")
            print(shlex.join(c))
        return 0
    width = max(len(h.target) for h in hosts)
    procs: list[subprocess.Popen] = []
    pumps: list[threading.Thread] = []
    for h, c in zip(hosts, cmds):
        p = subprocess.Popen(c, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        procs.append(p)
        pre = f"[{h.target:<{width}}] "
        for src, dst in ((p.stdout, sys.stdout), (p.stderr, sys.stderr)):
            t = threading.Thread(target=_pump, args=(src, dst, None, pre), daemon=True)
            t.start()
            pumps.append(t)
    first_fail: tuple[int, int] | None = None
    try:
        while True:
            codes = [p.poll() for p in procs]
            for i, c in enumerate(codes):
                if c not in (None, 0) and first_fail is None:
                    first_fail = (i, c)
            if first_fail or all(c is not None for c in codes):
                break
            time.sleep(0.2)
    except KeyboardInterrupt:
        first_fail = first_fail or (-1, 130)
    if first_fail:
        _stop_all(procs)
    for t in pumps:
        t.join(timeout=5)
    if first_fail:
        i, c = first_fail
        if i >= 0:
            why = ("ssh could not connect or run the command: check `ssh -o BatchMode=yes "
                   f"{hosts[i].target} true` works (keys, known_hosts)") if c == 255 else "see its output above"
            print(f"gptforge launch: host {hosts[i].target} (node {i}) failed with exit code {c}; {why}; "
                  f"stopped the other nodes", file=sys.stderr, flush=True)
        return c
    return 0


def _stop_all(procs: list[subprocess.Popen], grace: float = 20.0) -> None:
    for p in procs:
        if p.poll() is None and p.stdin:
            try:
                p.stdin.close()  # the remote `launch --watch-stdin` stops its torchrun on EOF
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


# ----------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    args, cmd = parse_args(sys.argv[1:] if argv is None else argv)
    validate(args, cmd)
    if args.hostfile:
        return run_hostfile(args, cmd)
    if args.nnodes == 1 and not args.master_addr:
        args.master_addr = "127.0.0.1"
    plan = build_plan(args, cmd)
    if args.dry_run:
        print(format_dry_run(plan))
        return 0
    if args.check:
        from gptforge.launch import doctor

        dargs = ["--nnodes", str(args.nnodes), "--node-rank", str(args.node_rank), "--master-addr",
                 args.master_addr, "--master-port", str(args.master_port), "--wait", str(args.wait)]
        if args.iface:
            dargs += ["--iface", args.iface]
        rc = doctor.main(dargs)
        if rc != 0:
            print("gptforge launch: doctor found problems (FAIL above); not launching", file=sys.stderr)
            return rc
    return run_plan(plan, watch_stdin=args.watch_stdin)


if __name__ == "__main__":
    raise SystemExit(main())
