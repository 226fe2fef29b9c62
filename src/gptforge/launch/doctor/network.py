"""Network checks of one node: the environment, the interface, the master address and its port."""

from __future__ import annotations

import os
import time

from gptforge.launch import netutil
from gptforge.launch.doctor.options import DoctorOptions
from gptforge.launch.doctor.report import FAIL, INFO, PASS, WARN, Report


def check_environment(rep: Report) -> None:
    keys = sorted(k for k in os.environ if k.startswith(("NCCL_", "GLOO_", "HSA_", "MASTER_", "RCCL_", "HIP_VISIBLE",
                                                        "CUDA_VISIBLE", "ROCR_VISIBLE", "GPTFORGE_", "TORCH_NCCL")))
    rep(INFO, "environment", ", ".join(f"{k}={os.environ[k]}" for k in keys) or "no NCCL_/GLOO_/HSA_/MASTER_ variables set")
    if os.environ.get("MASTER_ADDR") or os.environ.get("MASTER_PORT"):
        rep(WARN, "environment", "MASTER_ADDR/MASTER_PORT are set in the shell",
            "unset them; gptforge launch passes the master with --master-addr/--master-port")


def check_interface(rep: Report, opts: DoctorOptions) -> str | None:
    """Returns the interface to use for gloo/NCCL (given or routed), or None when it FAILed."""
    if opts.iface:
        names = netutil.interfaces()
        if opts.iface not in names:
            rep(FAIL, "interface", f"interface '{opts.iface}' does not exist on this node; available: "
                f"{netutil.describe_interfaces()}",
                "pass --iface with the interface on the network the nodes share (see `ip -br addr`)")
            return None
        if not netutil.iface_is_up(opts.iface):
            rep(FAIL, "interface", f"interface '{opts.iface}' is down", f"ip link set {opts.iface} up")
            return None
        addrs = netutil.iface_addresses(opts.iface)
        if not addrs:
            rep(FAIL, "interface", f"interface '{opts.iface}' has no IPv4 address",
                f"give it one (ip addr add A.B.C.D/24 dev {opts.iface}) or pick another --iface")
            return None
        rep(PASS, "interface", f"{opts.iface} is up with {', '.join(addrs)}")
        iface = opts.iface
    else:
        iface = None
        if opts.nnodes > 1:
            iface, src = netutil.route_iface(opts.master_addr)
            if iface:
                rep(WARN, "interface", f"no --iface given; traffic to {opts.master_addr} leaves by {iface} ({src})",
                    f"pass --iface {iface} to launch so NCCL/gloo use this interface and not another one")
            else:
                rep(FAIL, "interface", f"no route from this node to {opts.master_addr}; interfaces: "
                    f"{netutil.describe_interfaces()}",
                    "check --master-addr, and pass --iface with the interface on the shared network")
                return None
    if opts.nnodes > 1 and opts.node_rank == 0:
        try:
            master_ip = netutil.resolve(opts.master_addr)
        except Exception as e:
            rep(FAIL, "master address", str(e), "use node 0's IP address for --master-addr")
            return None
        mine = netutil.iface_addresses(iface) if iface else []
        if master_ip in mine:
            rep(PASS, "master address", f"{opts.master_addr} is {iface}'s address on this node")
        elif netutil.is_local(master_ip):
            rep(WARN, "master address", f"{opts.master_addr} belongs to this node but not to {iface} ({', '.join(mine)})",
                f"use --master-addr {mine[0] if mine else '<address of --iface>'} so the others reach node 0 over {iface}")
        else:
            rep(FAIL, "master address", f"--master-addr {opts.master_addr} is not an address of this node "
                f"(node 0 hosts the rendezvous); its addresses: {', '.join(sorted(netutil.local_addresses()))}",
                f"on node 0 pass its own address on the shared network, e.g. --master-addr {mine[0] if mine else '...'}")
            return None
    return iface


def check_master_port(rep: Report, opts: DoctorOptions, deadline: float) -> bool:
    host, port = opts.master_addr, opts.master_port
    if opts.node_rank == 0:
        ok, why = netutil.port_free(netutil.resolve(host), port)
        if ok:
            rep(PASS, "master port", f"{host}:{port} is free on this node")
        else:
            rep(FAIL, "master port", f"port {port} on {host} cannot be used ({why}): another process holds it "
                f"(an earlier run or doctor still running? `ss -ltnp | grep :{port}`)",
                "stop that process or pick another --master-port, the same on every node")
        return ok
    first, last = time.monotonic(), ("?", "")
    announced = False
    while True:
        left = deadline - time.monotonic()
        kind, detail = netutil.probe_tcp(host, port, max(0.5, min(opts.connect_timeout, left)))
        if kind == "ok":
            waited = time.monotonic() - first
            rep(PASS, "master reachable", f"{host}:{port} accepts connections"
                + (f" (after waiting {waited:.0f} s)" if waited > 2 else ""))
            return True
        last = (kind, detail)
        if time.monotonic() >= deadline - 0.5:
            break
        if not announced:
            print(f"       waiting up to {opts.wait:.0f} s for {host}:{port} ({detail}) ...", flush=True)
            announced = True
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
    kind, detail = last
    if kind == "refused":
        rep(FAIL, "master reachable", f"port {port} closed on master {host} (connection refused) after waiting "
            f"{opts.wait:.0f} s: the host answers but nothing listens on that port",
            f"start `gptforge doctor --node-rank 0 ...` (or launch) on the master first, use the same --master-port on "
            f"every node, and open TCP port {port} in the master's firewall")
    elif kind == "timeout":
        rep(FAIL, "master reachable", f"master {host}:{port} unreachable (connection timed out, {detail}; waited "
            f"{opts.wait:.0f} s): no answer at all",
            f"check --master-addr is node 0's address on the shared network and that no firewall drops TCP {port}")
    elif kind == "unreachable":
        rep(FAIL, "master reachable", f"master {host} unreachable ({detail}; waited {opts.wait:.0f} s): "
            "no host answers at that address on this network",
            "check --master-addr (node 0's address on the shared network, `ip -br addr` there) and --iface")
    else:
        rep(FAIL, "master reachable", f"cannot connect to {host}:{port}: {detail}",
            "check --master-addr, --master-port and the network")
    return False
