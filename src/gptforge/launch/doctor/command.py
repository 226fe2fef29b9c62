"""`gptforge doctor`: the order of the checks (see gptforge.launch.doctor)."""

from __future__ import annotations

import os
import socket
import time

from gptforge.launch.doctor.advice import memory
from gptforge.launch.doctor.device import check_hardware
from gptforge.launch.doctor.network import check_environment, check_interface, check_master_port
from gptforge.launch.doctor.options import DoctorOptions
from gptforge.launch.doctor.peers import meet
from gptforge.launch.doctor.report import INFO, Report


def main(opts: DoctorOptions) -> int:
    opts.check_node()
    # c10d warns when reverse DNS of a peer fails (common on clusters and in namespaces): not a problem
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    opts.master_addr = opts.master()
    start = time.monotonic()
    deadline = start + opts.wait
    rep = Report(opts.node_rank)
    print(f"gptforge doctor: node {opts.node_rank} of {opts.nnodes} on {socket.gethostname()}, master "
          f"{opts.master_addr}:{opts.master_port}", flush=True)
    check_environment(rep)
    iface = check_interface(rep, opts)
    net_ok = iface is not None or (not opts.iface and opts.nnodes == 1)
    port_ok = net_ok and check_master_port(rep, opts, deadline) if opts.nnodes > 1 else net_ok
    dev = check_hardware(rep, opts)
    if opts.nnodes == 1:
        memory(rep, opts, dev)
    elif port_ok and not rep.failed:
        meet(rep, opts, deadline, iface, dev)
    else:
        rep(INFO, "peers", "skipped the checks with the other nodes (fix the FAILs above first)")
    print(rep.summary(time.monotonic() - start), flush=True)
    return 1 if rep.failed else 0
