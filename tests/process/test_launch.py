"""`gptforge launch`: the torchrun command it builds, its errors, failure reporting, hostfile parsing."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from gptforge import cli
from gptforge.errors import UserError
from gptforge.launch import failures, hostfile


def launch_main(argv: list[str]) -> int:
    return cli.run_command("launch", argv)


def dry(capsys, *argv) -> tuple[dict[str, str], list[str]]:
    """Run `launch --dry-run`; return (exported env, the torchrun argv parsed back with shlex)."""
    assert launch_main(["--dry-run", *argv]) == 0
    out = capsys.readouterr().out
    env, cmd_lines = {}, []
    for line in out.splitlines():
        if line.startswith("export "):
            k, _, v = line[len("export "):].partition("=")
            env[k] = shlex.split(v)[0] if v else ""
        else:
            cmd_lines.append(line)
    return env, shlex.split(" ".join(cmd_lines).replace("\\ ", " "))


def test_multi_node_command(capsys):
    env, argv = dry(capsys, "--nnodes", "2", "--node-rank", "1", "--master-addr", "10.1.2.3", "--master-port",
                    "29600", "--iface", "lo", "--no-ib", "--nproc-per-node", "4", "--rdzv-timeout", "300",
                    "--", "pretrain", "--train.max_steps=5", "--model.preset=nano")
    assert env["NCCL_SOCKET_IFNAME"] == "lo" and env["GLOO_SOCKET_IFNAME"] == "lo"
    assert env["NCCL_IB_DISABLE"] == "1"
    assert "GPTFORGE_COLLECTIVE_TIMEOUT_S" not in env  # the training config's parallel.timeout_s decides
    assert env["GPTFORGE_NODE_RANK"] == "1" and env["GPTFORGE_NNODES"] == "2"
    assert argv[:3] == [sys.executable, "-m", "torch.distributed.run"]
    for a in ("--nnodes=2", "--nproc-per-node=4", "--rdzv-backend=c10d",
              "--rdzv-endpoint=10.1.2.3:29600", "--rdzv-id=gptforge", "--rdzv-conf=is_host=0,join_timeout=300",
              "--local-addr=127.0.0.1", "--max-restarts=0"):
        assert a in argv, a
    i = argv.index("-m", 3)
    assert argv[i:] == ["-m", "gptforge", "pretrain", "--train.max_steps=5", "--model.preset=nano"]
    assert "--standalone" not in argv


def test_node0_hosts_the_rendezvous(capsys):
    _, argv = dry(capsys, "--nnodes", "3", "--node-rank", "0", "--master-addr", "10.0.0.1", "--", "sft")
    assert "--rdzv-conf=is_host=1,join_timeout=600" in argv
    assert "--rdzv-endpoint=10.0.0.1:29500" in argv  # default port
    assert argv[-3:] == ["-m", "gptforge", "sft"]


def test_single_node_is_standalone(capsys, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    env, argv = dry(capsys, "--", "pretrain")
    assert "--standalone" in argv and "--nnodes=1" in argv
    assert not any(a.startswith("--rdzv") for a in argv)
    assert "--nproc-per-node=1" in argv  # no GPU here: one process
    assert "NCCL_SOCKET_IFNAME" not in env and "NCCL_IB_DISABLE" not in env
    assert int(env["OMP_NUM_THREADS"]) >= 1


def test_max_restarts_gives_each_attempt_a_fresh_store(capsys, monkeypatch):
    """torchrun's shared agent store keeps the previous attempt's addresses (pytorch/pytorch#135712):
    under --max-restarts launch turns the sharing off; without restarts it leaves torchrun's default."""
    monkeypatch.delenv("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", raising=False)
    env, argv = dry(capsys, "--max-restarts", "2", "--", "pretrain")
    assert env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1" and "--max-restarts=2" in argv
    env, argv = dry(capsys, "--", "pretrain")
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE" not in env and "--max-restarts=0" in argv
    monkeypatch.setenv("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "0")  # the user's own choice wins
    env, _ = dry(capsys, "--max-restarts", "1", "--", "pretrain")
    assert env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "0"


def test_script_and_module_targets_and_timeout(capsys, tmp_path, monkeypatch):
    script = tmp_path / "ex.py"
    script.write_text("print(1)\n")
    _, argv = dry(capsys, "--nproc-per-node", "2", "--collective-timeout", "45", "--", str(script), "--x", "1")
    assert argv[-3:] == [str(script), "--x", "1"] and "-m" not in argv[3:]
    env, argv = dry(capsys, "--collective-timeout", "45", "--", "-m", "pkg.mod", "a")
    assert argv[-3:] == ["-m", "pkg.mod", "a"] and env["GPTFORGE_COLLECTIVE_TIMEOUT_S"] == "45"
    monkeypatch.setenv("GPTFORGE_COLLECTIVE_TIMEOUT_S", "50")
    env, _ = dry(capsys, "--", "pretrain")
    assert "GPTFORGE_COLLECTIVE_TIMEOUT_S" not in env  # the user's value stays


SPY_TIMEOUT = r'''
import os

import torch.distributed as dist
from gptforge.config.schema import ParallelSection
from gptforge.parallel.exit import run_main
from gptforge.parallel.mesh import init_distributed, shutdown

real = dist.init_process_group


def spy(*args, **kwargs):
    # one write of the whole line: print() writes the text and the newline apart, and the two ranks'
    # lines interleaved on the shared pipe ("... 77 scollective timeout 77 s\n\n")
    os.write(1, f"collective timeout {kwargs['timeout'].total_seconds():.0f} s\n".encode())
    return real(*args, **kwargs)


dist.init_process_group = spy
# end as gptforge's own workers do (barrier, destroy, os._exit): gloo may abort at interpreter exit
run_main(lambda: shutdown(init_distributed(ParallelSection(strategy="ddp", timeout_s=77), "cpu")))
'''


def test_launch_keeps_the_configured_collective_timeout(capsys, tmp_path, monkeypatch):
    """parallel.timeout_s is what the training processes use under launch: launch sets no timeout of its
    own (it used to export GPTFORGE_COLLECTIVE_TIMEOUT_S=30, which overrode the config); only an explicit
    --collective-timeout does."""
    monkeypatch.delenv("GPTFORGE_COLLECTIVE_TIMEOUT_S", raising=False)
    env, argv = dry(capsys, "--nnodes", "2", "--master-addr", "10.0.0.1", "--", "pretrain", "--parallel.timeout_s=77")
    assert "GPTFORGE_COLLECTIVE_TIMEOUT_S" not in env and argv[-1] == "--parallel.timeout_s=77"
    env, _ = dry(capsys, "--collective-timeout", "45", "--", "pretrain", "--parallel.timeout_s=77")
    assert env["GPTFORGE_COLLECTIVE_TIMEOUT_S"] == "45"
    # a real run: both processes build their process group with the configured 77 s
    script = tmp_path / "spy.py"
    script.write_text(SPY_TIMEOUT)
    r = subprocess.run([sys.executable, "-m", "gptforge", "launch", "--nproc-per-node", "2", "--", str(script)],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.splitlines().count("collective timeout 77 s") == 2, r.stdout + r.stderr[-2000:]


def test_dry_run_output_runs_in_a_shell(capsys, tmp_path):
    """The printed lines are copy-pasteable: a shell sees the same argv."""
    assert launch_main(["--dry-run", "--nnodes", "2", "--master-addr", "10.0.0.1", "--", "pretrain",
                        "--train.out_dir=runs/a b"]) == 0
    text = capsys.readouterr().out
    script = text.replace(f"{sys.executable} -m torch.distributed.run", "printf '%s\\n'", 1)
    r = subprocess.run(["bash", "-c", script], capture_output=True, text=True)
    assert r.returncode == 0
    assert r.stdout.splitlines()[-1] == "--train.out_dir=runs/a b"


@pytest.mark.parametrize("argv,msg", [
    (["--iface", "eth9", "--", "pretrain"], "network interface 'eth9' does not exist on this node; available: lo"),
    (["--nnodes", "2", "--node-rank", "2", "--master-addr", "1.2.3.4", "--", "pretrain"],
     "--node-rank 2 is out of range for --nnodes 2"),
    (["--nnodes", "2", "--node-rank", "-1", "--master-addr", "1.2.3.4", "--", "pretrain"], "out of range"),
    (["--nnodes", "2", "--", "pretrain"], "--master-addr is required"),
    (["--nnodes", "2", "--master-addr", "h"], "no command to launch"),
    (["--", "missing_script.py"], "script missing_script.py not found"),
    (["--", "gptforge", "pretrain"], "give the gptforge command itself"),
])
def test_bad_args(argv, msg):
    with pytest.raises(UserError, match=__import__("re").escape(msg)):
        launch_main(["--dry-run", *argv])


def test_cli_prints_user_error_without_traceback():
    r = subprocess.run([sys.executable, "-m", "gptforge", "launch", "--iface", "eth9", "--", "pretrain"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.startswith("gptforge: error: network interface 'eth9' does not exist")
    assert "Traceback" not in r.stderr


# ---------------------------------------------------------------------------------------------------
# failure summary

SUMMARY = textwrap.dedent("""\
    [rank1]: Traceback (most recent call last):
    [rank1]:   File "x.py", line 3, in <module>
    [rank1]: RuntimeError: boom from rank 1
    E1125 10:00:00.000 torch/distributed/elastic/multiprocessing/api.py:900] failed (exitcode: 1)
    Traceback (most recent call last):
    torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
    ============================================================
    x.py FAILED
    ------------------------------------------------------------
    Failures:
      <NO_OTHER_FAILURES>
    ------------------------------------------------------------
    Root Cause (first observed failure):
    [0]:
      time      : 2025-11-25_10:00:00
      host      : node-a
      rank      : 1 (local_rank: 1)
      exitcode  : 1 (pid: 1234)
      error_file: <N/A>
      traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html
    ============================================================""").splitlines()


def test_parse_and_explain_failure():
    f = failures.parse_failure(SUMMARY)
    assert f["rank"] == "1" and f["local_rank"] == "1" and f["host"] == "node-a" and f["exitcode"].startswith("1")
    msg = failures.explain_failure(SUMMARY, node_rank=3, rc=1)
    assert "rank 1 (local rank 1) on node 3" in msg and "RuntimeError: boom from rank 1" in msg
    killed = [ln.replace("1 (pid: 1234)", "-9 (pid: 1234) (SIGKILL)").replace(
        "To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html",
        "Signal 9 (SIGKILL) received by PID 1234") for ln in SUMMARY if not ln.startswith("[rank1]")]
    msg = failures.explain_failure(killed, node_rank=0, rc=1)
    assert "exit code -9 (SIGKILL)" in msg
    assert "rendezvous failed" in failures.explain_failure(["RendezvousTimeoutError: x"], 0, 1)


PEER_FIRST = textwrap.dedent("""\
    [rank0]: RuntimeError: [../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection reset by peer
    ============================================================
    gptforge FAILED
    ------------------------------------------------------------
    Failures:
    [1]:
      time      : 2025-11-25_10:00:01
      host      : node-b
      rank      : 1 (local_rank: 1)
      exitcode  : -9 (pid: 4321)
      error_file: <N/A>
      traceback : Signal 9 (SIGKILL) received by PID 4321
    ------------------------------------------------------------
    Root Cause (first observed failure):
    [0]:
      time      : 2025-11-25_10:00:00
      host      : node-b
      rank      : 0 (local_rank: 0)
      exitcode  : 1 (pid: 1234)
      error_file: <N/A>
      traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html
    ============================================================""").splitlines()


def test_killed_rank_is_named_even_when_a_peer_failed_first():
    blocks = failures.parse_failures(PEER_FIRST)
    assert [b["rank"] for b in blocks] == ["0", "1"]  # torchrun's root cause first
    msg = failures.explain_failure(PEER_FIRST, node_rank=1, rc=1)
    assert "rank 1 (local rank 1) on node 1" in msg and "SIGKILL" in msg


DIE = r'''
import os, sys, time, datetime, torch, torch.distributed as dist
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=float(os.environ.get("GPTFORGE_COLLECTIVE_TIMEOUT_S", "30"))))
r, x = dist.get_rank(), torch.ones(10)
for i in range(1000):
    dist.all_reduce(x)
    if i == 5 and r == 1:
        os._exit(7)
    time.sleep(0.01)
'''


def test_rank_death_ends_single_node_job(tmp_path: Path):
    script = tmp_path / "die.py"
    script.write_text(DIE)
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "gptforge", "launch", "--nproc-per-node", "2", "--", str(script)],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode != 0 and time.monotonic() - t0 < 60
    assert "gptforge launch: rank 1 (local rank 1) on node 0" in r.stderr and "exit code 7" in r.stderr, r.stderr


# ---------------------------------------------------------------------------------------------------
# hostfile


def test_hostfile_parse_and_commands(tmp_path, capsys, monkeypatch):
    hf = tmp_path / "hosts"
    hf.write_text("# two nodes\n10.0.0.1 slots=2 iface=eth1\nroot@10.0.0.2 slots=4  # second\n\n")
    hosts = hostfile.parse_hostfile(str(hf))
    assert [(h.target, h.addr, h.slots, h.iface) for h in hosts] == [
        ("10.0.0.1", "10.0.0.1", 2, "eth1"), ("root@10.0.0.2", "10.0.0.2", 4, None)]
    monkeypatch.setenv("NCCL_DEBUG", "INFO")
    assert launch_main(["--hostfile", str(hf), "--dry-run", "--ssh-config", "/x/cfg", "-o", "Port=2222",
                        "--", "pretrain", "--train.max_steps=5"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if not ln.startswith("#")]
    assert len(lines) == 2
    for i, line in enumerate(lines):
        argv = shlex.split(line)
        assert argv[:6] == ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-F"]
        assert "Port=2222" in argv
        remote = argv[-1]
        assert f"--node-rank {i}" in remote and "--nnodes 2" in remote and "--master-addr 10.0.0.1" in remote
        assert "--watch-stdin" in remote and remote.endswith("-- pretrain --train.max_steps=5")
        assert "NCCL_DEBUG=INFO" in remote
    assert "--iface eth1" in lines[0] and "--nproc-per-node 2" in lines[0]
    assert "--local-addr 10.0.0.2" in lines[1] and "--nproc-per-node 4" in lines[1]
    assert shlex.split(lines[1])[-2] == "root@10.0.0.2"


@pytest.mark.parametrize("text,msg", [("", "lists no hosts"), ("h1 slots=x\n", "cannot read 'slots=x'"),
                                      ("h1 color=red\n", "cannot read 'color=red'")])
def test_hostfile_errors(tmp_path, text, msg):
    hf = tmp_path / "hosts"
    hf.write_text(text)
    with pytest.raises(UserError, match=msg):
        launch_main(["--hostfile", str(hf), "--dry-run", "--", "pretrain"])
    with pytest.raises(UserError, match="cannot read hostfile"):
        launch_main(["--hostfile", str(tmp_path / "nope"), "--", "pretrain"])


def test_unreachable_peers_names_the_lost_nodes():
    peers = {"0": "10.0.0.1", "1": "10.0.0.2", "2": "10.0.0.3"}
    down = {"10.0.0.2": "Network is unreachable"}
    line = failures.unreachable_peers(peers, 0, 29500, check=lambda a, p: down.get(a))
    assert line == ("gptforge launch: node 0: unreachable from this node: node 1 (10.0.0.2): Network is unreachable; "
                    "the network link between the nodes is down or the machine is gone (the run stopped after "
                    "parallel.timeout_s)")
    assert failures.unreachable_peers(peers, 1, 29500, check=lambda a, p: None) is None
    assert failures.unreachable_peers({}, 0, 29500) is None


def test_probe_tells_a_refusal_from_no_route():
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens: refused, so the machine is there
    assert failures.probe("127.0.0.1", port) is None
    assert failures.probe("256.1.1.1", port) is not None  # not an address


def test_failure_without_torchrun_summary_names_the_rank():
    lines = ["[rank1]: Traceback (most recent call last):",
             "[rank1]: RuntimeError: [gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 20000ms for recv"]
    assert failures.worker_error(lines[1]) == "1" and failures.worker_error(lines[0]) is None
    msg = failures.explain_failure(lines, node_rank=1, rc=-15)
    assert msg.splitlines()[0].startswith("gptforge launch: rank 1 on node 1 (")
    assert msg.splitlines()[0].endswith("failed: RuntimeError: [gloo/transport/tcp/unbound_buffer.cc:78] Timed out "
                                        "waiting 20000ms for recv")
    assert msg.splitlines()[1] == "gptforge launch: torchrun exited with code -15"


def test_hostfile_refuses_env_names_that_are_not_identifiers(tmp_path):
    """Row 11 of issue 22: a forwarded variable *name* holding `$(touch FILE)` must not run on the hosts. The `ssh`
    on PATH here runs the remote command through `sh -c`, as sshd does on the far side."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ssh").write_text('#!/bin/sh\nfor a; do last="$a"; done\nexec sh -c "$last"\n')
    (bin_dir / "ssh").chmod(0o755)
    (tmp_path / "hosts").write_text("127.0.0.1\n")
    marker = tmp_path / "pwned"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", f"NCCL_$(touch {marker})": "1",
           "NCCL_DEBUG": "INFO"}
    r = subprocess.run([sys.executable, "-m", "gptforge", "launch", "--hostfile", str(tmp_path / "hosts"),
                        "--remote-python", "/bin/true", "--", "pretrain"],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert not marker.exists()
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "environment variable name" in lines[0] and "touch" in lines[0], r.stderr
