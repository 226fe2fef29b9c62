"""`gptforge bench --nodes 2`: the settings of a slow-link run compared on two network-namespace nodes.

Each node has its own folder and GPTFORGE_CACHE (nothing shared by accident) with its own copy of the
data, and runs `gptforge launch --nnodes 2 --nproc-per-node 1 --iface IF -- pretrain ...` inside its
namespace. Node 0's metrics.jsonl gives the median step time after the warm-up and the last loss; the
compute-only step is one process doing the same per-rank work on this machine. A setting that fails
(e.g. an option this version does not know) is one row with its error, not the end of the table."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from gptforge.bench import local
from gptforge.bench.netns import NodePair
from gptforge.bench.options import BenchOptions, check_steps, pretrain_args, read_metrics
from gptforge.data.corpus import shakespeare_path
from gptforge.errors import UserError

DDP = "--parallel.strategy=ddp"
SETTINGS: dict[str, list[str]] = {
    "ddp": [DDP],
    "bf16": [DDP, "--parallel.grad_compression=bf16"],
    "powersgd": [DDP, "--parallel.grad_compression=powersgd"],
    "sync4": [DDP, "--parallel.sync_every=4"],
    "sync8": [DDP, "--parallel.sync_every=8"],
    "sync16": [DDP, "--parallel.sync_every=16"],
    "fsdp": ["--parallel.strategy=fsdp"],
    "auto": [],
}
PORT = 29700


def parse_settings(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in names if s not in SETTINGS]
    if bad or not names:
        raise UserError(f"unknown bench setting(s) {', '.join(bad) or '(none given)'}; choose from {', '.join(SETTINGS)}")
    return names


def copy_data(a: BenchOptions, node_dir: Path) -> str:
    """Put this node's own copy of the data in its folder; returns the path relative to it."""
    src = Path(a.data) if a.data else shakespeare_path()
    if not src.exists():
        raise UserError(f"--data {src} does not exist")
    if src.is_dir():
        shutil.copytree(src, node_dir / "data")
        return "data"
    shutil.copy2(src, node_dir / src.name)
    return src.name


def error_line(log: str) -> str:
    """The most telling line of a failed node's output."""
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    for key in ("gptforge: error:", "Error:", "error:"):
        hit = next((ln for ln in lines if key in ln), None)
        if hit:
            return hit[-300:]
    return lines[-1][-300:] if lines else "no output"


def run_setting(net: NodePair, a: BenchOptions, name: str, index: int, dirs: list[Path], data: str,
                threads: int) -> dict:
    row = {"setting": name, "options": " ".join(SETTINGS[name])}
    cmd = ["pretrain", *pretrain_args(a, f"runs/{name}", data, SETTINGS[name])]
    procs, logs = [], []
    for i, d in enumerate(dirs):
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), GPTFORGE_CACHE=str(d / "cache"), PYTHONUNBUFFERED="1")
        for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(k, None)
        argv = [sys.executable, "-m", "gptforge", "launch", "--nnodes", "2", "--node-rank", str(i),
                "--nproc-per-node", "1", "--master-addr", net.nodes[0].ip, "--master-port", str(PORT + index),
                "--iface", net.nodes[i].iface, "--rdzv-timeout", "120", "--", *cmd]
        logs.append(open(d / f"{name}.log", "w+"))
        procs.append(net.popen(i, argv, cwd=d, env=env, stdout=logs[-1], stderr=logs[-1]))
    print(f"bench: {name} on 2 nodes ({' '.join(SETTINGS[name]) or 'defaults'}) ...", file=sys.stderr, flush=True)
    t0 = time.monotonic()
    deadline, failed_at = t0 + a.run_timeout, None
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        if failed_at is None and any(p.poll() not in (None, 0) for p in procs):
            failed_at = time.monotonic()  # give the other node a moment to report, then stop it
        if failed_at is not None and time.monotonic() - failed_at > 30:
            break
        time.sleep(0.5)
    timed_out = any(p.poll() is None for p in procs) and failed_at is None
    for p in procs:
        net.stop(p)
    outs = []
    for f in logs:
        f.seek(0)
        outs.append(f.read())
        f.close()
    row["wall_s"] = time.monotonic() - t0
    if timed_out:
        return row | {"error": f"stopped after --run-timeout {a.run_timeout:g} s"}
    bad = [i for i, p in enumerate(procs) if p.returncode != 0]
    if bad:
        return row | {"error": f"node {bad[0]} exit {procs[bad[0]].returncode}: {error_line(outs[bad[0]])}"}
    try:
        return row | read_metrics(dirs[0] / "runs" / name, a.warmup)
    except (OSError, UserError) as e:
        return row | {"error": str(e)}


def format_table(base: dict, rows: list[dict]) -> str:
    ref = next((r.get("final_loss") for r in rows if r["setting"] == "ddp" and "error" not in r), None)
    lines = [f"{'setting':<10} {'median ms':>9} {'vs compute':>10} {'mean ms':>9} {'vs compute':>10} "
             f"{'final loss':>10} {'vs ddp':>7}  options"]
    lines.append(f"{'compute':<10} {base['step_ms']:>9.1f} {'1.00x':>10} {base['mean_ms']:>9.1f} {'1.00x':>10} "
                 f"{base['final_loss']:>10.4f} {'':>7}  one process, same per-rank work")
    for r in rows:
        if "error" in r:
            lines.append(f"{r['setting']:<10} failed: {r['error']}")
            continue
        vs = f"{(r['final_loss'] - ref) / ref * 100:+.1f}%" if ref else "-"
        lines.append(f"{r['setting']:<10} {r['step_ms']:>9.1f} {r['step_ms'] / base['step_ms']:>9.2f}x "
                     f"{r['mean_ms']:>9.1f} {r['mean_ms'] / base['mean_ms']:>9.2f}x "
                     f"{r['final_loss']:>10.4f} {vs:>7}  {r['options']}")
    return "\n".join(lines)


def main(a: BenchOptions) -> int:
    names = parse_settings(a.settings)
    check_steps(a)
    threads = a.threads or max(1, (os.cpu_count() or 1) // 2)
    with tempfile.TemporaryDirectory(prefix="gptforge-bench-nodes-") as tmp, NodePair(a.rate) as net:
        root = Path(tmp)
        dirs = [root / f"node{i}" for i in (0, 1)]
        for d in dirs:
            (d / "cache").mkdir(parents=True)
        data = [copy_data(a, d) for d in dirs][0]
        (root / "compute").mkdir()
        own = str(root / "compute" / copy_data(a, root / "compute"))
        single = BenchOptions(**{**vars(a), "threads": threads, "data": own})
        base = local.run_mode("single", single, root)
        rows = [run_setting(net, a, n, i, dirs, data, threads) for i, n in enumerate(names)]
    for r in rows:
        if "step_ms" in r:
            r["vs_compute"] = r["step_ms"] / base["step_ms"]
            r["mean_vs_compute"] = r["mean_ms"] / base["mean_ms"]
    print(f"2 nodes, link {a.rate or 'not limited'}, model {a.preset}, micro-batch {a.micro_batch} per rank, "
          f"{a.precision}, {threads} thread(s) per process, steps {a.warmup + 1}..{a.steps}")
    print(format_table(base, rows))
    if a.json:
        Path(a.json).write_text(json.dumps({"compute": base, "settings": rows}, indent=2) + "\n")
    return 0
