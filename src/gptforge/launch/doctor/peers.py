"""The checks with all nodes: rendezvous through a TCPStore on master:port (every node waits up to
--wait seconds for the others, so nodes started 30 s apart still meet), torch versions, clock skew, then
the all-reduce benchmark and the accumulation advice."""

from __future__ import annotations

import datetime
import gc
import json
import os
import socket
import time

from gptforge.hardware import DeviceInfo
from gptforge.launch import netutil
from gptforge.launch.doctor.advice import accumulation
from gptforge.launch.doctor.bench import allreduce
from gptforge.launch.doctor.device import backend_for
from gptforge.launch.doctor.options import DoctorOptions
from gptforge.launch.doctor.report import FAIL, PASS, WARN, Report


def meet(rep: Report, opts: DoctorOptions, deadline: float, iface: str | None, dev: DeviceInfo) -> bool:
    """Meet the other nodes through a TCPStore on master:port, then check clocks and measure the network."""
    import torch.distributed as dist

    if iface:
        os.environ["GLOO_SOCKET_IFNAME"] = iface
        os.environ.setdefault("NCCL_SOCKET_IFNAME", iface)
    left = max(5.0, deadline - time.monotonic())
    try:
        store = dist.TCPStore(opts.master_addr, opts.master_port, opts.nnodes, opts.node_rank == 0,
                              timeout=datetime.timedelta(seconds=left), wait_for_workers=False)
    except Exception as e:
        rep(FAIL, "rendezvous", f"cannot open the store on {opts.master_addr}:{opts.master_port}: "
            f"{str(e).splitlines()[0][:200]}", "see the master checks above")
        return False
    if not _join(rep, opts, deadline, iface, dev, store):
        return False
    ok = _measure(rep, opts, dev, store)
    # node 0 hosts the store: let the others finish with it before this process (its server) goes away
    try:
        store.set(f"doctor/done/{opts.node_rank}", "1")
        if opts.node_rank == 0:
            store.wait([f"doctor/done/{r}" for r in range(opts.nnodes)], datetime.timedelta(seconds=15))
    except Exception:
        pass
    return ok


def _join(rep: Report, opts: DoctorOptions, deadline: float, iface: str | None, dev: DeviceInfo, store) -> bool:
    """Every node posts who it is and waits for the others: which joined, their hosts, devices, torch versions."""
    import torch

    t0 = time.monotonic()
    me = {"host": socket.gethostname(), "addr": netutil.iface_address(iface) if iface else None,
          "torch": torch.__version__, "device": dev.describe(), "time": time.time()}
    store.set(f"doctor/node/{opts.node_rank}", json.dumps(me))
    missing = []
    try:
        keys = [f"doctor/node/{r}" for r in range(opts.nnodes)]
        store.wait(keys, datetime.timedelta(seconds=max(1.0, deadline - time.monotonic())))
    except Exception:
        missing = [r for r in range(opts.nnodes) if not store.check([f"doctor/node/{r}"])]
    if missing:
        rep(FAIL, "peers", f"node(s) {', '.join(map(str, missing))} did not join within {opts.wait:.0f} s",
            "start `gptforge doctor` on every node with the same --nnodes/--master-addr/--master-port (a larger "
            "--wait if they start far apart)")
        return False
    peers = [json.loads(store.get(f"doctor/node/{r}")) for r in range(opts.nnodes)]
    waited = time.monotonic() - t0
    rep(PASS, "peers", f"all {opts.nnodes} nodes joined" + (f" (after {waited:.0f} s)" if waited > 2 else "") + ": "
        + "; ".join(f"node {r} {p['host']} {p['addr'] or ''} {p['device']}" for r, p in enumerate(peers)))
    versions = {p["torch"] for p in peers}
    if len(versions) > 1:
        rep(WARN, "torch versions", f"nodes run different torch versions: {sorted(versions)}",
            "use the same image / environment on every node")
    return True


def _measure(rep: Report, opts: DoctorOptions, dev: DeviceInfo, store) -> bool:
    """A process group across the nodes: clock skew, all-reduce bandwidth and the accumulation it advises."""
    import torch
    import torch.distributed as dist

    backend = backend_for(opts, dev)
    device = torch.device("cuda", 0) if backend == "nccl" else torch.device("cpu")
    pg_store = dist.PrefixStore("doctor/pg", store)
    try:
        dist.init_process_group(backend, store=pg_store, rank=opts.node_rank, world_size=opts.nnodes,
                                timeout=datetime.timedelta(seconds=max(30.0, opts.wait)),
                                device_id=device if backend == "nccl" else None)
    except Exception as e:
        rep(FAIL, "process group", f"{backend} across {opts.nnodes} nodes failed: {str(e).splitlines()[0][:200]}",
            "check that --iface is the interface on the shared network (and the same kind on every node)")
        return False
    try:
        _clock_skew(rep, opts, device)
        bw = allreduce(rep, opts, device, backend)
        if bw:
            accumulation(rep, opts, dev, *bw)
        dist.barrier()
    except Exception as e:
        rep(FAIL, "all-reduce", f"collective between nodes failed: {str(e).splitlines()[0][:300]}",
            "a peer died or the network dropped; check --iface on every node and the firewall (gloo/NCCL also "
            "use random ports between the nodes)")
        return False
    finally:
        # end cleanly (gloo can abort at exit otherwise)
        gc.collect()
        try:
            dist.destroy_process_group()
        except Exception:
            pass
    return True


def _clock_skew(rep: Report, opts: DoctorOptions, device) -> None:
    import torch
    import torch.distributed as dist

    skews = []
    for _ in range(5):
        dist.barrier()
        t = torch.tensor([time.time()], dtype=torch.float64, device=device)
        out = [torch.zeros_like(t) for _ in range(opts.nnodes)]
        dist.all_gather(out, t)
        vals = [float(x.item()) for x in out]
        skews.append(max(vals) - min(vals))
    skew = sorted(skews)[len(skews) // 2]
    if skew <= opts.skew_warn:
        rep(PASS, "clock skew", f"{skew * 1000:.1f} ms between nodes")
    else:
        rep(WARN, "clock skew", f"clocks differ by {skew:.2f} s between nodes (log times and checkpoints disagree)",
            "enable time sync on every node: `timedatectl set-ntp true` or chrony")
