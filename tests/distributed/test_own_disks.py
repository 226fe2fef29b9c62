"""Two machines that share nothing: two network-namespace nodes, each in its own folder with its
own copy of the data and its own GPTFORGE_CACHE, run `gptforge launch`. Save -> stop -> resume gives the
losses of an uninterrupted run (1e-5) under DDP, HSDP, TP x replication and local SGD (per-replica optimizer states); node 0 alone holds the complete checkpoint, from
which `generate` and `export-hf` work and on which one process and four processes resume exactly."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distributed._fixtures import base_gpt2, run_args  # noqa: F401  (fixture)
from distributed._harness import ABORT_MARKERS, assert_losses_close, job_env, read_losses, torchrun
from support.netns import netns_unavailable_reason, two_nodes

pytestmark = [pytest.mark.netns, pytest.mark.timeout(600),
              pytest.mark.skipif(netns_unavailable_reason() is not None, reason=str(netns_unavailable_reason()))]

LAYOUTS = {  # name -> (processes per node, micro-batch per rank, options): global batch 8 as base_gpt2
    "ddp": (1, 4, ["--parallel.strategy=ddp"]),
    "hsdp": (2, 2, ["--parallel.strategy=fsdp", "--parallel.dp_replicate=2", "--parallel.dp_shard=2"]),
    "tp": (2, 4, ["--parallel.tp=2"]),  # tensor parallel inside each node, replicated across the nodes
    "localsgd": (1, 4, ["--parallel.strategy=ddp", "--parallel.sync_every=4", "--parallel.outer_momentum=0.9"]),
}


def _launch_both(net, homes, nproc: int, port: int, train: list[str], tag: str) -> list[str]:
    procs, logs = [], []
    for i in (0, 1):
        log = open(homes[i] / f"{tag}.log", "w+")
        logs.append(log)
        argv = [sys.executable, "-m", "gptforge", "launch", "--nnodes", "2", "--node-rank", str(i),
                "--nproc-per-node", str(nproc), "--master-addr", net[0].ip, "--master-port", str(port),
                "--iface", net[i].iface, "--rdzv-timeout", "120", "--", *train]
        procs.append(net.popen(i, argv, env=job_env(GPTFORGE_CACHE=str(homes[i] / "cache")), cwd=homes[i],
                               stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        if any(p.poll() not in (None, 0) for p in procs):
            time.sleep(10)
            break
        time.sleep(0.3)
    outs = []
    for p, log in zip(procs, logs):
        net.kill(p)
        log.seek(0)
        outs.append(log.read())
        log.close()
    report = "\n".join(f"---- node {i} (exit {p.returncode}) ----\n" + "\n".join(o.splitlines()[-40:])
                       for i, (p, o) in enumerate(zip(procs, outs)))
    assert all(p.returncode == 0 for p in procs), report
    assert not any(m in o for o in outs for m in ABORT_MARKERS), report
    return outs


def _steps(run: Path) -> list[str]:
    ck = run / "checkpoints"
    return sorted(p.name for p in ck.iterdir()) if ck.is_dir() else []


@pytest.fixture(scope="module")
def own_disk_runs(tmp_path_factory, char_data):
    """Each layout: 5 steps with a checkpoint, stop; then resume=auto to 10. Returns {layout: (homes, outs)}."""
    results = {}
    with two_nodes(subnet="10.84.0") as net:
        for k, (name, (nproc, mb, opts)) in enumerate(LAYOUTS.items()):
            root = tmp_path_factory.mktemp(f"own_{name}")
            homes = [root / f"node{i}" for i in (0, 1)]
            for h in homes:
                h.mkdir()
                shutil.copytree(char_data, h / "data")  # each node its own copy of the data
            train = ["pretrain", *run_args("runs/x", "data", f"--train.micro_batch={mb}", "--train.save_every=5",
                                           "--train.log_every=1", *opts)]
            first = _launch_both(net, homes, nproc, 29600 + 2 * k, [*train, "--train.stop_after=5"], "first")
            snapshot = [_steps(h / "runs/x") for h in homes]
            second = _launch_both(net, homes, nproc, 29601 + 2 * k, [*train, "--train.resume=auto"], "second")
            results[name] = dict(homes=homes, outs=(first, second), snapshot=snapshot)
    return results


@pytest.fixture(scope="module")
def localsgd_reference(tmp_path_factory, char_data):
    """Local SGD uninterrupted, 2 processes on one machine: what the two own-disk nodes must reproduce."""
    out = tmp_path_factory.mktemp("localsgd_ref")
    torchrun(2, ["pretrain", *run_args(out, char_data, "--train.micro_batch=4", "--train.save_every=5",
                                       "--train.log_every=1", *LAYOUTS["localsgd"][2])])
    return out


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_save_stop_resume_matches_uninterrupted(own_disk_runs, base_gpt2, localsgd_reference, layout):
    r = own_disk_runs[layout]
    run0, run1 = (h / "runs/x" for h in r["homes"])
    # node 0 alone holds the checkpoint; node 1's disk has none (and no half-written one)
    assert r["snapshot"] == [["step_0000005"], []], r["snapshot"]
    assert "do not share" in r["outs"][0][0] and "node 0 keeps each full checkpoint" in r["outs"][0][0]
    assert "resumed from" in r["outs"][1][0] and "at step 5" in r["outs"][1][0]
    assert _steps(run0) == ["step_0000005", "step_0000010"] and _steps(run1) == []
    want = read_losses(localsgd_reference if layout == "localsgd" else base_gpt2)
    assert_losses_close(read_losses(run0), want)  # steps 1-5, then 6-10 after the resume


def test_generate_and_export_from_node0_copy(own_disk_runs, tmp_path):
    run0 = own_disk_runs["hsdp"]["homes"][0] / "runs/x"  # sharded while training: consolidated on node 0
    env = job_env()
    r = subprocess.run([sys.executable, "-m", "gptforge", "generate", "--checkpoint", str(run0), "--prompt", "To",
                        "--max-new-tokens", "20", "--seed", "1"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("To") and len(r.stdout.strip()) > 2, r.stderr[-2000:]
    out = tmp_path / "hf"
    r = subprocess.run([sys.executable, "-m", "gptforge", "export-hf", "--checkpoint", str(run0), "--out", str(out)],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "model.safetensors").stat().st_size > 10_000 and (out / "config.json").is_file()


@pytest.mark.parametrize("nproc", [1, 4])
def test_two_node_checkpoint_resumes_on_other_world_sizes(own_disk_runs, base_gpt2, tmp_path, nproc):
    """Node 0's step-5 checkpoint (saved by 2 nodes) resumed on one process and on four (micro-batch 8/nproc)."""
    src = own_disk_runs["ddp"]["homes"][0] / "runs/x/checkpoints/step_0000005"
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(src, run / "checkpoints" / src.name)
    data = own_disk_runs["ddp"]["homes"][0] / "data"
    train = ["pretrain", *run_args(run, data, f"--train.micro_batch={8 // nproc}", "--train.log_every=1",
                                   "--train.resume=auto", "--parallel.strategy=ddp" if nproc > 1 else "--train.seed=1337")]
    argv = ([sys.executable, "-m", "gptforge", *train] if nproc == 1 else
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
             "--max-restarts=0", "-m", "gptforge", *train])
    r = subprocess.run(argv, capture_output=True, text=True, env=job_env(), timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert_losses_close(read_losses(run), read_losses(base_gpt2)[5:])
