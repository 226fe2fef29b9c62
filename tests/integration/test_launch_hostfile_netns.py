"""`gptforge launch --hostfile` over real SSH between two network-namespace nodes.

Each namespace runs its own sshd (key-only root login, listening on the node's address); the launcher
runs inside node 0's namespace and ssh-es to both hosts (itself included), as on a real cluster.
Needs root, `ip`, and openssh-server (/usr/sbin/sshd); skipped otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support.netns import netns_unavailable_reason, two_nodes

SSHD = "/usr/sbin/sshd"
pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(netns_unavailable_reason() is not None, reason=str(netns_unavailable_reason())),
    pytest.mark.skipif(not os.path.exists(SSHD) or not shutil.which("ssh-keygen"),
                       reason="needs openssh-server (apt-get install openssh-server)"),
]


@pytest.fixture
def ssh_nodes(tmp_path):
    """Two namespace nodes, each with an sshd on its address; yields (net, ssh_config_path)."""
    d = tmp_path / "ssh"
    d.mkdir(mode=0o700)
    for name in ("host_ed25519", "id_ed25519"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True)
    shutil.copy(d / "id_ed25519.pub", d / "authorized_keys")
    (d / "authorized_keys").chmod(0o600)
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    cfg = d / "ssh_config"
    cfg.write_text(f"Host *\n  User root\n  IdentityFile {d}/id_ed25519\n  IdentitiesOnly yes\n"
                   f"  UserKnownHostsFile {d}/known_hosts\n  StrictHostKeyChecking accept-new\n"
                   f"  BatchMode yes\n  ConnectTimeout 5\n  LogLevel ERROR\n")
    with two_nodes() as net:
        for n in net.nodes:
            conf = d / f"sshd_{n.index}"
            conf.write_text(f"ListenAddress {n.ip}\nHostKey {d}/host_ed25519\nPidFile {d}/sshd{n.index}.pid\n"
                            f"PermitRootLogin prohibit-password\nPubkeyAuthentication yes\nPasswordAuthentication no\n"
                            f"KbdInteractiveAuthentication no\nAuthorizedKeysFile {d}/authorized_keys\n"
                            f"StrictModes no\nUsePAM no\nPrintMotd no\nSetEnv PATH={os.environ.get('PATH', '')}\n")
            # -D: stays in the foreground, so the fixture tracks and kills it; nsenter: no /sys remount
            net.popen(n.index, [SSHD, "-D", "-f", str(conf), "-E", str(d / f"sshd{n.index}.log")], nsenter=True)
        for n in net.nodes:  # wait until both answer
            for _ in range(50):
                r = net.run(0, ["ssh", "-F", str(cfg), n.ip, "true"], timeout=15)
                if r.returncode == 0:
                    break
                time.sleep(0.2)
            else:
                pytest.fail(f"sshd on {n.ip} does not answer: {r.stderr}")
        yield net, cfg


WORKER = r'''
import os, sys, socket, datetime, torch, torch.distributed as dist
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
r = dist.get_rank()
x = torch.tensor([float(r + 1)])
dist.all_reduce(x)
sys.stdout.write(f"rank {r} of {dist.get_world_size()} node {os.environ['GPTFORGE_NODE_RANK']} sum {x.item():.0f}\n")
sys.stdout.flush()
if len(sys.argv) > 1 and r == int(sys.argv[1]):
    raise SystemExit(5)
dist.barrier()
dist.destroy_process_group()
'''


def _hostfile(tmp_path: Path, net, slots: int = 1) -> Path:
    hf = tmp_path / "hosts"
    hf.write_text("".join(f"{n.ip} slots={slots} iface={n.iface}\n" for n in net.nodes))
    return hf


def test_hostfile_runs_every_node_over_ssh(ssh_nodes, tmp_path):
    net, cfg = ssh_nodes
    script = tmp_path / "w.py"
    script.write_text(WORKER)
    hf = _hostfile(tmp_path, net, slots=2)
    r = net.run(0, [sys.executable, "-m", "gptforge", "launch", "--hostfile", str(hf), "--ssh-config", str(cfg),
                    "--", str(script)], timeout=120, cwd=tmp_path)
    print(r.stdout, r.stderr)
    assert r.returncode == 0
    lines = [ln for ln in r.stdout.splitlines() if " sum " in ln]
    assert len(lines) == 4 and all(ln.endswith("sum 10") for ln in lines)  # 1+2+3+4 over 2 nodes x 2 slots
    assert sum(ln.startswith("[10.77.0.2] ") and "node 1" in ln for ln in lines) == 2  # prefixed by host


def test_hostfile_failure_stops_all(ssh_nodes, tmp_path):
    net, cfg = ssh_nodes
    script = tmp_path / "w.py"
    script.write_text(WORKER.replace("dist.barrier()", "import time; time.sleep(300)"))
    hf = _hostfile(tmp_path, net)
    t0 = time.monotonic()
    r = net.run(0, [sys.executable, "-m", "gptforge", "launch", "--hostfile", str(hf), "--ssh-config", str(cfg),
                    "--", str(script), "1"], timeout=120, cwd=tmp_path)
    print(r.stdout, r.stderr)
    assert r.returncode != 0 and time.monotonic() - t0 < 60
    assert "host 10.77.0.2 (node 1) failed with exit code" in r.stderr
    assert "rank 1 (local rank 0) on node 1" in r.stderr
    # nothing of the job is left on either node (only the sshd daemons)
    for i in (0, 1):
        ps = net.run(i, ["ip", "netns", "pids", net[i].ns]).stdout.split()
        cmdlines = [Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    for p in ps if Path(f"/proc/{p}/cmdline").exists()]
        assert not [c for c in cmdlines if "w.py" in c or "torch.distributed.run" in c], cmdlines


def _losses(out_dir: Path) -> list[float]:
    rows = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in rows if "train/loss" in r]


@pytest.mark.slow
def test_hostfile_training_matches_single_node(ssh_nodes, tmp_path):
    net, cfg = ssh_nodes
    train = ["pretrain", "--train.max_steps=5", "--train.micro_batch=4", "--train.grad_accum=1",
             "--train.precision=fp32", "--train.log_every=1", "--train.eval_every=1000", "--train.sample_tokens=0",
             "--train.tensorboard=false", "--train.progress=false", "--train.warmup_steps=2"]
    hf = _hostfile(tmp_path, net)
    multi, single = tmp_path / "multi", tmp_path / "single"
    r = net.run(0, [sys.executable, "-m", "gptforge", "launch", "--hostfile", str(hf), "--ssh-config", str(cfg),
                    "--", *train, f"--train.out_dir={multi}"], timeout=400, cwd=tmp_path)
    print(r.stdout[-3000:], r.stderr[-3000:])
    assert r.returncode == 0
    r = subprocess.run([sys.executable, "-m", "gptforge", "launch", "--nproc-per-node", "2", "--",
                        *train, f"--train.out_dir={single}"], capture_output=True, text=True, timeout=400, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = _losses(multi), _losses(single)
    assert len(a) == len(b) == 5
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5, (a, b)
