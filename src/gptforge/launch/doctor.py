"""`gptforge doctor`: check one node (and its peers) before a multi-node run.

Run it on every node with the same node flags as `gptforge launch`:

    gptforge doctor --nnodes 2 --node-rank 0 --master-addr 10.0.0.1 --iface eth0
    gptforge doctor --nnodes 2 --node-rank 1 --master-addr 10.0.0.1 --iface eth0

Each check prints PASS / WARN / FAIL (with the fix) or INFO; the exit code is 1 when anything FAILs.
Checks: environment (NCCL_*, GLOO_*, HSA_*, MASTER_*), GPU and collective backend, interface
(exists, up, has an address; on node 0 the master address is its own), master reachable on its
port (node > 0; refused, timed out and unreachable are told apart) or the port free (node 0), then
with all nodes: clock skew, a timed all-reduce (latency, bus bandwidth) and the gradient
accumulation that keeps communication under 10% of a step for ``--preset``.

Nodes meet through a TCPStore on master:port; every node waits up to ``--wait`` seconds for the
others, so nodes started 30 s apart still meet.

Step-time estimate for the accumulation advice: compute per micro-batch = FLOPs per token (6 x matmul
parameters + 12 x layers x d_model x context, PaLM appendix B) x tokens / (matmul TFLOPS measured here
x 0.5 model efficiency); communication per optimizer step = a ring all-reduce of the fp32 gradients,
2 (W-1)/W x 4 P bytes / measured bus bandwidth + latency (W = nnodes x GPUs per node). Accumulation
k keeps communication under 10% when comm <= 0.1 x (k x compute + comm), i.e. k >= 9 x comm / compute.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import socket
import sys
import time

from gptforge.launch import netutil

PASS, WARN, FAIL, INFO = "PASS", "WARN", "FAIL", "INFO"


class Report:
    def __init__(self, node_rank: int, out=None):
        self.node_rank = node_rank
        self.out = out or sys.stdout
        self.counts = {PASS: 0, WARN: 0, FAIL: 0, INFO: 0}

    def __call__(self, status: str, what: str, detail: str = "", fix: str = "") -> None:
        self.counts[status] += 1
        line = f"[{status}] {what}"
        if detail:
            line += f": {detail}"
        print(line, file=self.out, flush=True)
        if fix and status in (WARN, FAIL):
            print(f"       fix: {fix}", file=self.out, flush=True)

    @property
    def failed(self) -> bool:
        return self.counts[FAIL] > 0


def build_parser() -> argparse.ArgumentParser:
    from gptforge.launch.torchrun import _add_node_flags

    p = argparse.ArgumentParser(prog="gptforge doctor",
                                description="Check GPUs, network and peers before a (multi-node) run. "
                                            "Run on every node with the same flags as `gptforge launch`.")
    _add_node_flags(p)
    p.add_argument("--wait", type=float, default=120, help="seconds to wait for the master / the other nodes (default 120)")
    p.add_argument("--preset", default="tiny", help="model preset for the memory and accumulation advice (default tiny)")
    p.add_argument("--global-batch", type=int, default=256, help="sequences per optimizer step for the advice (default 256)")
    p.add_argument("--seq-len", type=int, default=None, help="context length for the advice (default: the preset's)")
    p.add_argument("--nproc-per-node", type=int, default=None, help="training processes per node (default: GPUs, or 1)")
    p.add_argument("--bandwidth-mb", type=float, default=64, help="all-reduce payload in MB for the bandwidth test (default 64)")
    p.add_argument("--connect-timeout", type=float, default=5, help="seconds per connection attempt to the master (default 5)")
    p.add_argument("--backend", choices=["auto", "gloo", "nccl"], default="auto",
                   help="collective backend for the all-reduce test (default: nccl with GPUs, else gloo)")
    p.add_argument("--skew-warn", type=float, default=0.5, help="clock skew in seconds that gives a WARN (default 0.5)")
    return p


# ----------------------------------------------------------------------------------------------------


def check_environment(rep: Report) -> None:
    keys = sorted(k for k in os.environ if k.startswith(("NCCL_", "GLOO_", "HSA_", "MASTER_", "RCCL_", "HIP_VISIBLE",
                                                        "CUDA_VISIBLE", "ROCR_VISIBLE", "GPTFORGE_", "TORCH_NCCL")))
    rep(INFO, "environment", ", ".join(f"{k}={os.environ[k]}" for k in keys) or "no NCCL_/GLOO_/HSA_/MASTER_ variables set")
    if os.environ.get("MASTER_ADDR") or os.environ.get("MASTER_PORT"):
        rep(WARN, "environment", "MASTER_ADDR/MASTER_PORT are set in the shell",
            "unset them; gptforge launch passes the master with --master-addr/--master-port")


def check_hardware(rep: Report, args) -> object:
    import torch

    from gptforge import hardware

    if getattr(torch.version, "hip", None) is not None:
        arch = hardware.rocm_arch_from_kfd()
        need = hardware.hsa_override(arch) if arch else None
        have = os.environ.get("HSA_OVERRIDE_GFX_VERSION")
        if need and not have:
            rep(WARN, "HSA override", f"{arch} usually needs HSA_OVERRIDE_GFX_VERSION={need}",
                f"export HSA_OVERRIDE_GFX_VERSION={need} (gptforge launch sets it for you)")
            os.environ["HSA_OVERRIDE_GFX_VERSION"] = need
        elif have:
            rep(INFO, "HSA override", f"HSA_OVERRIDE_GFX_VERSION={have}" + (f" (recommended for {arch}: {need})" if need else ""))
    try:
        dev = hardware.detect()
    except Exception as e:  # a broken driver shows up here
        rep(FAIL, "GPU", f"device query failed: {e}",
            "check the driver (nvidia-smi / rocm-smi), and in a container --gpus all or --device=/dev/kfd --device=/dev/dri")
        dev = hardware.DeviceInfo("cpu", "CPU", 8 * hardware.GiB)
    if dev.is_gpu:
        rep(PASS, "GPU", dev.describe())
    else:
        rep(WARN if args.nnodes > 1 else INFO, "GPU", f"no GPU visible, training runs on the CPU: {dev.describe()}",
            "if this node has GPUs: check nvidia-smi / rocm-smi; in Docker add --gpus all (NVIDIA) or "
            "--device=/dev/kfd --device=/dev/dri --group-add video (ROCm)")
    # collective backend in-process (world of one)
    import torch.distributed as dist

    backend = _backend(args, dev)
    try:
        store = dist.HashStore()
        dist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=datetime.timedelta(seconds=30))
        t = torch.ones(4, device="cuda" if backend == "nccl" else "cpu")
        dist.all_reduce(t)
        if backend == "nccl":
            torch.cuda.synchronize()
        dist.destroy_process_group()
        rep(PASS, "collective backend", f"{backend} initialises on this node (torch {torch.__version__})")
    except Exception as e:
        rep(FAIL, "collective backend", f"{backend} does not initialise: {str(e).splitlines()[0][:200]}",
            "for NCCL/RCCL check the GPU driver and that torch was built with it; gloo needs a working TCP stack")
    return dev


def _backend(args, dev) -> str:
    if args.backend != "auto":
        return args.backend
    import torch.distributed as dist

    return "nccl" if dev.is_gpu and dist.is_nccl_available() else "gloo"


def check_interface(rep: Report, args) -> str | None:
    """Returns the interface to use for gloo/NCCL (given or routed), or None when it FAILed."""
    if args.iface:
        names = netutil.interfaces()
        if args.iface not in names:
            rep(FAIL, "interface", f"interface '{args.iface}' does not exist on this node; available: "
                f"{netutil.describe_interfaces()}",
                "pass --iface with the interface on the network the nodes share (see `ip -br addr`)")
            return None
        if not netutil.iface_is_up(args.iface):
            rep(FAIL, "interface", f"interface '{args.iface}' is down", f"ip link set {args.iface} up")
            return None
        addrs = netutil.iface_addresses(args.iface)
        if not addrs:
            rep(FAIL, "interface", f"interface '{args.iface}' has no IPv4 address",
                f"give it one (ip addr add A.B.C.D/24 dev {args.iface}) or pick another --iface")
            return None
        rep(PASS, "interface", f"{args.iface} is up with {', '.join(addrs)}")
        iface = args.iface
    else:
        iface = None
        if args.nnodes > 1:
            iface, src = netutil.route_iface(args.master_addr)
            if iface:
                rep(WARN, "interface", f"no --iface given; traffic to {args.master_addr} leaves by {iface} ({src})",
                    f"pass --iface {iface} to launch so NCCL/gloo use this interface and not another one")
            else:
                rep(FAIL, "interface", f"no route from this node to {args.master_addr}; interfaces: "
                    f"{netutil.describe_interfaces()}",
                    "check --master-addr, and pass --iface with the interface on the shared network")
                return None
    if args.nnodes > 1 and args.node_rank == 0:
        try:
            master_ip = netutil.resolve(args.master_addr)
        except Exception as e:
            rep(FAIL, "master address", str(e), "use node 0's IP address for --master-addr")
            return None
        mine = netutil.iface_addresses(iface) if iface else []
        if master_ip in mine:
            rep(PASS, "master address", f"{args.master_addr} is {iface}'s address on this node")
        elif netutil.is_local(master_ip):
            rep(WARN, "master address", f"{args.master_addr} belongs to this node but not to {iface} ({', '.join(mine)})",
                f"use --master-addr {mine[0] if mine else '<address of --iface>'} so the others reach node 0 over {iface}")
        else:
            rep(FAIL, "master address", f"--master-addr {args.master_addr} is not an address of this node "
                f"(node 0 hosts the rendezvous); its addresses: {', '.join(sorted(netutil.local_addresses()))}",
                f"on node 0 pass its own address on the shared network, e.g. --master-addr {mine[0] if mine else '...'}")
            return None
    return iface


def check_master_port(rep: Report, args, deadline: float) -> bool:
    host, port = args.master_addr, args.master_port
    if args.node_rank == 0:
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
        kind, detail = netutil.probe_tcp(host, port, max(0.5, min(args.connect_timeout, left)))
        if kind == "ok":
            waited = time.monotonic() - first
            rep(PASS, "master reachable", f"{host}:{port} accepts connections"
                + (f" (after waiting {waited:.0f} s)" if waited > 2 else ""))
            return True
        last = (kind, detail)
        if time.monotonic() >= deadline - 0.5:
            break
        if not announced:
            print(f"       waiting up to {args.wait:.0f} s for {host}:{port} ({detail}) ...", flush=True)
            announced = True
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
    kind, detail = last
    if kind == "refused":
        rep(FAIL, "master reachable", f"port {port} closed on master {host} (connection refused) after waiting "
            f"{args.wait:.0f} s: the host answers but nothing listens on that port",
            f"start `gptforge doctor --node-rank 0 ...` (or launch) on the master first, use the same --master-port on "
            f"every node, and open TCP port {port} in the master's firewall")
    elif kind == "timeout":
        rep(FAIL, "master reachable", f"master {host}:{port} unreachable (connection timed out, {detail}; waited "
            f"{args.wait:.0f} s): no answer at all",
            f"check --master-addr is node 0's address on the shared network and that no firewall drops TCP {port}")
    elif kind == "unreachable":
        rep(FAIL, "master reachable", f"master {host} unreachable ({detail}; waited {args.wait:.0f} s): "
            "no host answers at that address on this network",
            "check --master-addr (node 0's address on the shared network, `ip -br addr` there) and --iface")
    else:
        rep(FAIL, "master reachable", f"cannot connect to {host}:{port}: {detail}",
            "check --master-addr, --master-port and the network")
    return False


# ----------------------------------------------------------------------------------------------------
# with all nodes


def _meet(rep: Report, args, deadline: float, iface: str | None, dev) -> bool:
    import json

    import torch
    import torch.distributed as dist

    if iface:
        os.environ["GLOO_SOCKET_IFNAME"] = iface
        os.environ.setdefault("NCCL_SOCKET_IFNAME", iface)
    left = max(5.0, deadline - time.monotonic())
    t0 = time.monotonic()
    try:
        store = dist.TCPStore(args.master_addr, args.master_port, args.nnodes, args.node_rank == 0,
                              timeout=datetime.timedelta(seconds=left), wait_for_workers=False)
    except Exception as e:
        rep(FAIL, "rendezvous", f"cannot open the store on {args.master_addr}:{args.master_port}: "
            f"{str(e).splitlines()[0][:200]}", "see the master checks above")
        return False
    me = {"host": socket.gethostname(), "addr": netutil.iface_address(iface) if iface else None,
          "torch": torch.__version__, "device": dev.describe(), "time": time.time()}
    store.set(f"doctor/node/{args.node_rank}", json.dumps(me))
    missing = []
    try:
        keys = [f"doctor/node/{r}" for r in range(args.nnodes)]
        store.wait(keys, datetime.timedelta(seconds=max(1.0, deadline - time.monotonic())))
    except Exception:
        missing = [r for r in range(args.nnodes) if not store.check([f"doctor/node/{r}"])]
    if missing:
        rep(FAIL, "peers", f"node(s) {', '.join(map(str, missing))} did not join within {args.wait:.0f} s",
            "start `gptforge doctor` on every node with the same --nnodes/--master-addr/--master-port (a larger "
            "--wait if they start far apart)")
        return False
    peers = [json.loads(store.get(f"doctor/node/{r}")) for r in range(args.nnodes)]
    waited = time.monotonic() - t0
    rep(PASS, "peers", f"all {args.nnodes} nodes joined" + (f" (after {waited:.0f} s)" if waited > 2 else "") + ": "
        + "; ".join(f"node {r} {p['host']} {p['addr'] or ''} {p['device']}" for r, p in enumerate(peers)))
    versions = {p["torch"] for p in peers}
    if len(versions) > 1:
        rep(WARN, "torch versions", f"nodes run different torch versions: {sorted(versions)}",
            "use the same image / environment on every node")

    backend = _backend(args, dev)
    device = torch.device("cuda", 0) if backend == "nccl" else torch.device("cpu")
    pg_store = dist.PrefixStore("doctor/pg", store)
    try:
        dist.init_process_group(backend, store=pg_store, rank=args.node_rank, world_size=args.nnodes,
                                timeout=datetime.timedelta(seconds=max(30.0, args.wait)),
                                device_id=device if backend == "nccl" else None)
    except Exception as e:
        rep(FAIL, "process group", f"{backend} across {args.nnodes} nodes failed: {str(e).splitlines()[0][:200]}",
            "check that --iface is the interface on the shared network (and the same kind on every node)")
        return False
    try:
        _clock_skew(rep, args, device)
        bw = _allreduce(rep, args, device, backend)
        if bw:
            _advice(rep, args, dev, *bw)
        dist.barrier()
    except Exception as e:
        rep(FAIL, "all-reduce", f"collective between nodes failed: {str(e).splitlines()[0][:300]}",
            "a peer died or the network dropped; check --iface on every node and the firewall (gloo/NCCL also "
            "use random ports between the nodes)")
        return False
    finally:
        # end cleanly (gloo can abort at exit otherwise, DESIGN.md)
        import gc

        gc.collect()
        try:
            dist.destroy_process_group()
        except Exception:
            pass
    # node 0 hosts the store: let the others finish with it before this process (its server) goes away
    try:
        store.set(f"doctor/done/{args.node_rank}", "1")
        if args.node_rank == 0:
            store.wait([f"doctor/done/{r}" for r in range(args.nnodes)], datetime.timedelta(seconds=15))
    except Exception:
        pass
    return True


def _clock_skew(rep: Report, args, device) -> None:
    import torch
    import torch.distributed as dist

    skews = []
    for _ in range(5):
        dist.barrier()
        t = torch.tensor([time.time()], dtype=torch.float64, device=device)
        out = [torch.zeros_like(t) for _ in range(args.nnodes)]
        dist.all_gather(out, t)
        vals = [float(x.item()) for x in out]
        skews.append(max(vals) - min(vals))
    skew = sorted(skews)[len(skews) // 2]
    if skew <= args.skew_warn:
        rep(PASS, "clock skew", f"{skew * 1000:.1f} ms between nodes")
    else:
        rep(WARN, "clock skew", f"clocks differ by {skew:.2f} s between nodes (log times and checkpoints disagree)",
            "enable time sync on every node: `timedatectl set-ntp true` or chrony")


def _timed(fn, min_iters: int, min_time: float, max_iters: int = 50) -> float:
    """Median seconds of fn() over at least min_iters calls / min_time seconds (after one warm-up)."""
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < max_iters and (len(times) < min_iters or time.perf_counter() - start < min_time):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


def _allreduce(rep: Report, args, device, backend: str):
    import torch
    import torch.distributed as dist

    n = args.nnodes
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run(t):
        def f():
            dist.all_reduce(t)
            sync()
        return f

    small = torch.ones(1, dtype=torch.float32, device=device)
    lat = _synced_time(run(small), 10, 0.3, device)
    results = []
    for mb in sorted({1.0, float(args.bandwidth_mb)}):
        numel = max(1, int(mb * 1e6 / 4))
        t = torch.ones(numel, dtype=torch.float32, device=device)
        sec = _synced_time(run(t), 3, 1.0, device)
        busbw = numel * 4 * 2 * (n - 1) / n / sec if n > 1 else 0.0
        results.append((mb, sec, busbw))
    if n == 1:
        rep(INFO, "all-reduce", "single node: no inter-node bandwidth to measure")
        return None
    size, sec, busbw = results[-1]
    detail = (f"{backend}, latency {lat * 1e3:.2f} ms; "
              + "; ".join(f"{m:g} MB in {s * 1e3:.0f} ms" for m, s, _ in results)
              + f" -> bus bandwidth {busbw / 1e6:.1f} MB/s = {busbw * 8 / 1e9:.3f} Gbit/s")
    slow = busbw * 8 < 0.5e9
    rep(WARN if slow else PASS, "all-reduce", detail,
        "under 0.5 Gbit/s: check the link speed (ethtool IFACE), that --iface is the fast interface, and "
        "use gradient accumulation (advice below)" if slow else "")
    return lat, busbw


def _synced_time(fn, min_iters: int, min_time: float, device) -> float:
    """Like _timed, but every rank runs the same number of iterations (rank 0 decides)."""
    import torch
    import torch.distributed as dist

    fn()
    times = []
    start = time.perf_counter()
    while True:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        more = torch.tensor([1 if (len(times) < min_iters or time.perf_counter() - start < min_time)
                             and len(times) < 50 else 0], device=device)
        dist.broadcast(more, 0)
        if not int(more.item()):
            break
    times.sort()
    return times[len(times) // 2]


def _matmul_tflops(dev) -> float:
    """Achieved matmul TFLOPS on this device in the training precision (a short measurement)."""
    import torch

    from gptforge import hardware

    prec = hardware.choose_precision(dev)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(prec, torch.float32)
    if dev.is_gpu:
        n, device = 4096, "cuda"
    else:
        n, device = 512, "cpu"
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def f():
        a @ b
        sync()

    sec = _timed(f, 3, 0.3)
    return 2 * n**3 / sec / 1e12


def _advice(rep: Report, args, dev, lat: float, busbw: float) -> None:
    from gptforge import hardware

    try:
        from gptforge.config.presets import MODEL_PRESETS

        model = MODEL_PRESETS[args.preset]
    except KeyError:
        rep(WARN, "advice", f"unknown preset '{args.preset}'", "pass --preset with a name from gptforge.config.presets")
        return
    gpus = args.nproc_per_node or max(1, dev.count if dev.is_gpu else 1)
    world = args.nnodes * gpus
    seq = args.seq_len or model["block_size"]
    auto = hardware.auto_config(model, dev, args.global_batch, world, seq)
    rep(INFO if auto.fits else WARN, "memory", f"preset {args.preset}: {auto.reason}",
        "" if auto.fits else "use FSDP or a smaller preset")
    P = hardware.count_params(model)
    comm = 2 * (world - 1) / world * 4 * P / busbw + 2 * lat * max(1, math.ceil(4 * P / 25e6))  # 25 MB DDP buckets
    tflops = _matmul_tflops(dev) * 0.5
    compute = hardware.flops_per_token(model, seq) * auto.micro_batch * seq / (tflops * 1e12)
    k = max(1, math.ceil(9 * comm / compute))
    frac = comm / (auto.grad_accum * compute + comm)
    detail = (f"preset {args.preset} ({P / 1e6:.0f}M params, {world} ranks): gradient all-reduce ~{comm:.2f} s per "
              f"optimizer step; compute ~{compute:.2f} s per micro-batch of {auto.micro_batch}x{seq} tokens "
              f"(~{tflops:.1f} TFLOPS effective); accumulation >= {k} keeps communication under 10%")
    if auto.grad_accum >= k:
        rep(PASS, "accumulation", detail + f" (auto-config uses {auto.grad_accum}: {frac:.0%})")
    else:
        rep(WARN, "accumulation", detail + f"; with {auto.grad_accum} communication is {frac:.0%} of a step",
            f"--train.grad_accum={k} --train.micro_batch={auto.micro_batch} (effective batch "
            f"{k * auto.micro_batch * world} sequences), or a faster network")


# ----------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    from gptforge.errors import UserError

    # c10d warns when reverse DNS of a peer fails (common on clusters and in namespaces): not a problem
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")

    if args.nnodes < 1 or not 0 <= args.node_rank < args.nnodes:
        raise UserError(f"--node-rank {args.node_rank} is out of range for --nnodes {args.nnodes}: use 0..{args.nnodes - 1}")
    if args.nnodes > 1 and not args.master_addr:
        raise UserError("--master-addr is required with --nnodes > 1 (node 0's address, the same on every node)")
    if not args.master_addr:
        args.master_addr = "127.0.0.1"
    start = time.monotonic()
    deadline = start + args.wait
    rep = Report(args.node_rank)
    print(f"gptforge doctor: node {args.node_rank} of {args.nnodes} on {socket.gethostname()}, master "
          f"{args.master_addr}:{args.master_port}", flush=True)
    check_environment(rep)
    iface = check_interface(rep, args)
    net_ok = iface is not None or (not args.iface and args.nnodes == 1)
    port_ok = net_ok and check_master_port(rep, args, deadline) if args.nnodes > 1 else net_ok
    dev = check_hardware(rep, args)
    if args.nnodes == 1:
        from gptforge import hardware

        try:
            from gptforge.config.presets import MODEL_PRESETS

            auto = hardware.auto_config(MODEL_PRESETS[args.preset], dev, args.global_batch,
                                        args.nproc_per_node or max(1, dev.count if dev.is_gpu else 1), args.seq_len)
            rep(INFO if auto.fits else WARN, "memory", f"preset {args.preset}: {auto.reason}",
                "" if auto.fits else "use FSDP or a smaller preset")
        except KeyError:
            rep(WARN, "advice", f"unknown preset '{args.preset}'", "pass --preset with a name from gptforge.config.presets")
    elif port_ok and not rep.failed:
        _meet(rep, args, deadline, iface, dev)
    elif args.nnodes > 1:
        rep(INFO, "peers", "skipped the checks with the other nodes (fix the FAILs above first)")
    c = rep.counts
    print(f"doctor: {c[PASS]} passed, {c[WARN]} warnings, {c[FAIL]} failed ({time.monotonic() - start:.0f} s)", flush=True)
    return 1 if rep.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
