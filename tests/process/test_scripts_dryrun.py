"""scripts/*.sh: shellcheck-clean, and the exact docker command each prints with --dry-run.

Nothing here needs Docker or a GPU: the vendor is forced with GPTFORGE_GPU, and --dry-run prints the
command (shell-quoted, one line) instead of running it.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "scripts"
ALL_SCRIPTS = sorted(SCRIPTS.glob("*.sh"))
DOCKER_SCRIPTS = ["docker_run.sh", "docker_run_ddp.sh", "docker_test_network.sh", "build.sh", "install_docker.sh"]

# Variables the scripts read; removed so the host's environment cannot change the output.
_SCRIPT_VARS = ("NNODES", "NODE_RANK", "MASTER_PORT", "MASTER_ADDR", "GPUS_PER_NODE", "GRAD_ACCUM",
                "PIP_INDEX_URL", "PIP_TRUSTED_HOST", "SUDO_USER", "OS_RELEASE_FILE")


def clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("GPTFORGE_", "HSA_", "HIP_", "CUDA_")) and k not in _SCRIPT_VARS}
    env.update(extra)
    return env


def sh(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPTS / script), *args], capture_output=True, text=True,
                          env=clean_env(**env), stdin=subprocess.DEVNULL, timeout=30)


def dry(script: str, *args: str, **env: str) -> list[str]:
    """The printed docker command, as argv."""
    r = sh(script, "--dry-run", *args, **env)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1, r.stdout
    return shlex.split(lines[0])


def flag_value(argv: list[str], flag: str) -> list[str]:
    """All values of a flag given as '--flag value' or '--flag=value'."""
    out = []
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            out.append(argv[i + 1])
        elif a.startswith(flag + "="):
            out.append(a[len(flag) + 1 :])
    return out


def env_of(argv: list[str]) -> dict[str, str]:
    return dict(v.split("=", 1) for v in flag_value(argv, "-e"))


def split_at_image(argv: list[str], image: str) -> tuple[list[str], list[str]]:
    i = argv.index(image)
    return argv[:i], argv[i + 1 :]


def assert_gpu_flags(opts: list[str], vendor: str) -> None:
    if vendor == "rocm":
        assert "--device=/dev/kfd" in opts and "--device=/dev/dri" in opts
        assert "video" in flag_value(opts, "--group-add")
        assert len(flag_value(opts, "--group-add")) == 2  # video + render (host gid when it exists)
        assert "seccomp=unconfined" in flag_value(opts, "--security-opt")
        assert "--gpus" not in opts
    else:
        assert flag_value(opts, "--gpus") == ["all"]
        assert not any(a.startswith("--device") for a in opts)
    assert flag_value(opts, "--ipc") == ["host"]
    assert flag_value(opts, "--shm-size") == ["16g"]


# ---------------------------------------------------------------------------------------- lint


def test_every_script_is_shellcheck_clean():
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if not shellcheck:
        pytest.fail("shellcheck not found; install the dev tools: pip install -e '.[dev]'")
    assert {p.name for p in ALL_SCRIPTS} >= set(DOCKER_SCRIPTS)
    files = [str(p) for p in ALL_SCRIPTS] + [str(ROOT / "docker" / "common.sh")]
    r = subprocess.run([shellcheck, "-x", *files], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("script", DOCKER_SCRIPTS)
def test_syntax_and_executable(script):
    path = SCRIPTS / script
    assert os.access(path, os.X_OK), f"{script} is not executable"
    assert path.read_text().startswith("#!/usr/bin/env bash\n")
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0


# ---------------------------------------------------------------------------------------- docker_run.sh


@pytest.mark.parametrize("vendor", ["rocm", "cuda"])
def test_docker_run_interactive(vendor):
    argv = dry("docker_run.sh", GPTFORGE_GPU=vendor)
    assert argv[:3] == ["docker", "run", "--rm"] and "-it" in argv
    opts, cmd = split_at_image(argv, f"gptforge:{vendor}")
    assert cmd == ["bash"]
    assert_gpu_flags(opts, vendor)
    vols = flag_value(opts, "-v")
    assert f"{ROOT}/data:/workspace/data" in vols and f"{ROOT}/runs:/workspace/runs" in vols
    assert "gptforge_cache:/cache" in vols


@pytest.mark.parametrize("vendor", ["rocm", "cuda"])
def test_docker_run_command(vendor):
    argv = dry("docker_run.sh", "gptforge", "pretrain", "--data.path=data/my corpus.txt",
               GPTFORGE_GPU=vendor, GPTFORGE_IMAGE="reg.example/gptforge:1", HSA_OVERRIDE_GFX_VERSION="12.0.1")
    opts, cmd = split_at_image(argv, "reg.example/gptforge:1")
    assert cmd == ["gptforge", "pretrain", "--data.path=data/my corpus.txt"]
    assert "-it" not in opts  # not a terminal
    assert_gpu_flags(opts, vendor)
    assert (env_of(opts).get("HSA_OVERRIDE_GFX_VERSION") == "12.0.1") == (vendor == "rocm")


# ---------------------------------------------------------------------------------------- docker_run_ddp.sh

PRESETS = {"tiny": (16, 8), "small": (8, 16), "medium": (4, 32)}


@pytest.mark.parametrize("vendor", ["rocm", "cuda"])
@pytest.mark.parametrize("preset", list(PRESETS))
def test_ddp_node(vendor, preset):
    argv = dry("docker_run_ddp.sh", "1", "10.0.0.1", preset, "3", "enp5s0", GPTFORGE_GPU=vendor, GPUS_PER_NODE="1")
    opts, cmd = split_at_image(argv, f"gptforge:{vendor}")
    assert opts[:3] == ["docker", "run", "--rm"]
    assert flag_value(opts, "--name") == ["gptforge-node1"]
    assert flag_value(opts, "--network") == ["host"]
    assert_gpu_flags(opts, vendor)
    env = env_of(opts)
    assert env["NODE_RANK"] == "1" and env["MASTER_ADDR"] == "10.0.0.1" and env["MASTER_PORT"] == "29500"
    assert env["NNODES"] == "2"
    assert env["NCCL_SOCKET_IFNAME"] == env["GLOO_SOCKET_IFNAME"] == "enp5s0"
    assert "NCCL_IB_DISABLE" not in env
    micro, accum = PRESETS[preset]
    assert micro * accum * 2 == 256  # effective batch over 2 nodes x 1 GPU
    sep = cmd.index("--")
    assert cmd[:sep] == ["gptforge", "launch", "--nnodes", "2", "--node-rank", "1", "--master-addr", "10.0.0.1",
                         "--master-port", "29500", "--iface", "enp5s0", "--nproc-per-node", "1"]
    assert cmd[sep + 1 :] == ["pretrain", f"--model.preset={preset}", "--parallel.strategy=ddp",
                              f"--train.micro_batch={micro}", f"--train.grad_accum={accum}", "--train.epochs=3",
                              f"--train.out_dir=runs/{preset}"]


def test_ddp_defaults_and_options():
    argv = dry("docker_run_ddp.sh", "0", "node0.lan", "--", "--train.lr=3e-4", "--data.path=a b",
               GPTFORGE_GPU="cuda", NNODES="4", MASTER_PORT="29600", GPTFORGE_NO_IB="1", GPUS_PER_NODE="1")
    opts, cmd = split_at_image(argv, "gptforge:cuda")
    env = env_of(opts)
    assert flag_value(opts, "--name") == ["gptforge-node0"]
    assert env["NCCL_SOCKET_IFNAME"] == "eth0" and env["NNODES"] == "4" and env["MASTER_PORT"] == "29600"
    assert env["NCCL_IB_DISABLE"] == "1"
    sep = cmd.index("--")
    launch = cmd[:sep]
    assert "--no-ib" in launch and launch[launch.index("--nnodes") + 1] == "4"
    assert launch[launch.index("--master-port") + 1] == "29600"
    # tiny over 4 nodes: accumulation halves so the effective batch stays 256.
    assert cmd[sep + 1 :] == ["pretrain", "--model.preset=tiny", "--parallel.strategy=ddp", "--train.micro_batch=16",
                              "--train.grad_accum=4", "--train.epochs=5", "--train.out_dir=runs/tiny", "--train.lr=3e-4",
                              "--data.path=a b"]


@pytest.mark.parametrize("gpus_env,expected", [
    ({"GPTFORGE_GPUS": "4"}, 4),
    ({"GPTFORGE_GPUS": "device=0,2"}, 2),
    ({"CUDA_VISIBLE_DEVICES": "0,1,2"}, 3),
    ({"GPUS_PER_NODE": "8", "CUDA_VISIBLE_DEVICES": "0"}, 8),
])
def test_ddp_one_process_per_gpu_of_the_container(gpus_env, expected):
    argv = dry("docker_run_ddp.sh", "0", "10.0.0.1", "tiny", GPTFORGE_GPU="cuda", **gpus_env)
    _, cmd = split_at_image(argv, "gptforge:cuda")
    sep = cmd.index("--")
    assert flag_value(cmd[:sep], "--nproc-per-node") == [str(expected)]
    accum = int(flag_value(cmd[sep:], "--train.grad_accum")[0])
    assert accum == max(1, 256 // (16 * 2 * expected))  # the effective batch stays 256 over 2 nodes


def test_ddp_counts_the_host_gpus_with_nvidia_smi(tmp_path):
    d = tmp_path / "bin"
    d.mkdir()
    (d / "nvidia-smi").write_text("#!/bin/sh\nprintf 'GPU 0: A (UUID: a)\\nGPU 1: A (UUID: b)\\n'\n")
    (d / "nvidia-smi").chmod(0o755)
    argv = dry("docker_run_ddp.sh", "0", "10.0.0.1", GPTFORGE_GPU="cuda", PATH=f"{d}:/usr/bin:/bin")
    _, cmd = split_at_image(argv, "gptforge:cuda")
    assert flag_value(cmd[: cmd.index("--")], "--nproc-per-node") == ["2"]


def test_ddp_passes_nccl_and_gloo_variables_through():
    argv = dry("docker_run_ddp.sh", "1", "10.0.0.1", "tiny", "5", "enp5s0", GPTFORGE_GPU="cuda", GPUS_PER_NODE="1",
               NCCL_DEBUG="INFO", NCCL_IB_DISABLE="1", NCCL_SOCKET_NTHREADS="4", GLOO_DEVICE_TRANSPORT="TCP",
               NCCL_SOCKET_IFNAME="wrong0", NCCLX="no", MY_NCCL_X="no")
    opts, cmd = split_at_image(argv, "gptforge:cuda")
    env = env_of(opts)
    assert env["NCCL_DEBUG"] == "INFO" and env["NCCL_IB_DISABLE"] == "1" and env["NCCL_SOCKET_NTHREADS"] == "4"
    assert env["GLOO_DEVICE_TRANSPORT"] == "TCP"
    assert env["NCCL_SOCKET_IFNAME"] == env["GLOO_SOCKET_IFNAME"] == "enp5s0"  # the script's iface wins
    assert "NCCLX" not in env and "MY_NCCL_X" not in env
    assert flag_value(opts, "-e").count("NCCL_IB_DISABLE=1") == 1
    with_no_ib = env_of(split_at_image(dry("docker_run_ddp.sh", "0", "10.0.0.1", GPTFORGE_GPU="cuda",
                                           GPUS_PER_NODE="1", GPTFORGE_NO_IB="1", NCCL_IB_DISABLE="1"),
                                       "gptforge:cuda")[0])
    assert with_no_ib["NCCL_IB_DISABLE"] == "1"


def test_ddp_strategy_can_be_overridden_after_the_separator():
    argv = dry("docker_run_ddp.sh", "0", "10.0.0.1", "--", "--parallel.strategy=fsdp", GPTFORGE_GPU="cuda",
               GPUS_PER_NODE="1")
    _, cmd = split_at_image(argv, "gptforge:cuda")
    strategies = [a for a in cmd if a.startswith("--parallel.strategy=")]
    assert strategies == ["--parallel.strategy=ddp", "--parallel.strategy=fsdp"]  # the last one wins


def test_ddp_header_states_what_each_node_needs():
    head = (SCRIPTS / "docker_run_ddp.sh").read_text().split("set -euo pipefail")[0]
    for needed in ("own disk", "own cache", "the image", "network interface", "open TCP port", "MASTER_PORT",
                   "does NOT need a shared disk", "NCCL_*", "GLOO_*", "One process per GPU"):
        assert needed in head, needed


# ---------------------------------------------------------------------------------------- docker_test_network.sh


@pytest.mark.parametrize("vendor", ["rocm", "cuda"])
def test_network_check_runs_doctor(vendor):
    argv = dry("docker_test_network.sh", "192.0.2.10", "enp5s0", "--", "--timeout", "60",
               GPTFORGE_GPU=vendor, NODE_RANK="1")
    opts, cmd = split_at_image(argv, f"gptforge:{vendor}")
    assert flag_value(opts, "--network") == ["host"]
    assert_gpu_flags(opts, vendor)
    env = env_of(opts)
    assert env["MASTER_ADDR"] == "192.0.2.10" and env["NODE_RANK"] == "1"
    assert env["NCCL_SOCKET_IFNAME"] == env["GLOO_SOCKET_IFNAME"] == "enp5s0"
    assert cmd == ["gptforge", "doctor", "--nnodes", "2", "--node-rank", "1", "--master-addr", "192.0.2.10",
                   "--master-port", "29500", "--iface", "enp5s0", "--timeout", "60"]


def test_network_check_guesses_rank_from_local_addresses():
    # Only parsed, never contacted: 127.0.0.1 is ours (rank 0), 192.0.2.10 (TEST-NET-1) is not.
    local = dry("docker_test_network.sh", "127.0.0.1", GPTFORGE_GPU="cuda")
    remote = dry("docker_test_network.sh", "192.0.2.10", GPTFORGE_GPU="cuda")
    assert env_of(local)["NODE_RANK"] == "0" and local[local.index("--node-rank") + 1] == "0"
    assert env_of(remote)["NODE_RANK"] == "1"
    assert env_of(local)["NCCL_SOCKET_IFNAME"] == "eth0"


# ---------------------------------------------------------------------------------------- build.sh


@pytest.mark.parametrize("vendor", ["rocm", "cuda"])
def test_build(vendor):
    argv = dry("build.sh", "--", "--no-cache", GPTFORGE_GPU=vendor, PIP_INDEX_URL="https://mirror.example/simple",
               GPTFORGE_EXTRAS="hf")
    assert argv[:2] == ["docker", "build"]
    assert flag_value(argv, "-f") == [str(ROOT / "docker" / f"Dockerfile.{vendor}")]
    assert flag_value(argv, "-t") == [f"gptforge:{vendor}"]
    build_args = flag_value(argv, "--build-arg")
    assert "PIP_INDEX_URL=https://mirror.example/simple" in build_args and "EXTRAS=hf" in build_args
    assert any(a.startswith("USER_UID=") for a in build_args)
    assert argv[-2:] == ["--no-cache", str(ROOT)]


# ---------------------------------------------------------------------------------------- install_docker.sh


def _install_steps(vendor: str, tmp_path: Path, os_id: str = "ubuntu") -> subprocess.CompletedProcess:
    rel = tmp_path / "os-release"
    rel.write_text(f"ID={os_id}\nVERSION_CODENAME=jammy\n")
    return sh("install_docker.sh", "--dry-run", "--user", "alice", GPTFORGE_GPU=vendor, OS_RELEASE_FILE=str(rel))


def test_install_docker_rocm(tmp_path):
    r = _install_steps("rocm", tmp_path)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "https://download.docker.com/linux/ubuntu jammy stable" in out
    assert "docker-ce" in out and "docker-compose-plugin" in out
    assert "usermod -aG docker alice" in out and "usermod -aG video,render alice" in out
    assert 'KERNEL=="kfd"' in out and "nvidia" not in out
    check = [ln for ln in out.splitlines() if ln.startswith("docker run")]
    assert len(check) == 1
    assert "--device=/dev/kfd" in check[0] and "--device=/dev/dri" in check[0] and "--group-add video" in check[0]
    assert "rocm/pytorch:rocm7.1_ubuntu22.04_py3.10_pytorch_release_2.8.0" in check[0]


def test_install_docker_cuda(tmp_path):
    r = _install_steps("cuda", tmp_path)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "nvidia-container-toolkit" in out and "nvidia-ctk runtime configure --runtime=docker" in out
    assert "usermod -aG docker alice" in out and "video,render" not in out
    check = [ln for ln in out.splitlines() if ln.startswith("docker run")]
    assert len(check) == 1 and "--gpus all" in check[0] and "nvcr.io/nvidia/pytorch:" in check[0]


def test_install_docker_rejects_other_distributions(tmp_path):
    r = _install_steps("cuda", tmp_path, os_id="fedora")
    assert r.returncode != 0 and r.stdout == ""
    assert "Ubuntu and Debian" in r.stderr and len(r.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------- vendor detection


def _fake_bin(tmp_path: Path, name: str) -> str:
    d = tmp_path / "bin"
    d.mkdir(exist_ok=True)
    (d / name).write_text("#!/bin/sh\nexit 0\n")
    (d / name).chmod(0o755)
    return f"{d}:/usr/bin:/bin"


@pytest.mark.skipif(os.path.exists("/dev/kfd"), reason="this machine has /dev/kfd, so ROCm is always detected")
@pytest.mark.parametrize("tool,vendor", [("nvidia-smi", "cuda"), ("rocm-smi", "rocm")])
def test_vendor_detection(tmp_path, tool, vendor):
    argv = dry("docker_run.sh", "true", PATH=_fake_bin(tmp_path, tool))
    assert f"gptforge:{vendor}" in argv
    assert_gpu_flags(split_at_image(argv, f"gptforge:{vendor}")[0], vendor)


@pytest.mark.skipif(os.path.exists("/dev/kfd"), reason="this machine has /dev/kfd")
def test_no_gpu_found(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    r = sh("docker_run.sh", "--dry-run", PATH=f"{d}:/usr/bin:/bin")
    if shutil.which("nvidia-smi", path="/usr/bin:/bin") or shutil.which("rocm-smi", path="/usr/bin:/bin"):
        pytest.skip("a GPU tool is installed in /usr/bin")
    assert r.returncode != 0 and "GPTFORGE_GPU" in r.stderr


# ---------------------------------------------------------------------------------------- bad arguments

BAD = [
    ("docker_run_ddp.sh", [], {}),
    ("docker_run_ddp.sh", ["0"], {}),
    ("docker_run_ddp.sh", ["2", "10.0.0.1"], {}),  # rank >= NNODES
    ("docker_run_ddp.sh", ["x", "10.0.0.1"], {}),
    ("docker_run_ddp.sh", ["0", "10.0.0.1", "huge"], {}),
    ("docker_run_ddp.sh", ["0", "10.0.0.1", "tiny", "0"], {}),
    ("docker_run_ddp.sh", ["0", "10.0.0.1", "tiny", "5", "bad iface"], {}),
    ("docker_run_ddp.sh", ["0", "10.0.0.1", "tiny", "5", "eth0", "extra"], {}),
    ("docker_run_ddp.sh", ["0", "bad;addr"], {}),
    ("docker_run_ddp.sh", ["0", "10.0.0.1"], {"MASTER_PORT": "70000"}),
    ("docker_run_ddp.sh", ["--bogus", "0", "10.0.0.1"], {}),
    ("docker_run_ddp.sh", ["0", "10.0.0.1"], {"GPTFORGE_GPU": "intel"}),
    ("docker_test_network.sh", [], {}),
    ("docker_test_network.sh", ["10.0.0.1", "eth0", "more"], {}),
    ("docker_test_network.sh", ["10.0.0.1"], {"NODE_RANK": "5"}),
    ("docker_run.sh", ["--bogus"], {}),
    ("docker_run.sh", ["--name"], {}),
    ("build.sh", ["extra"], {}),
    ("install_docker.sh", ["--bogus"], {}),
]


@pytest.mark.parametrize("script,args,env", BAD, ids=[f"{s}:{' '.join(a) or '-'}" for s, a, _ in BAD])
def test_bad_arguments(script, args, env):
    env = {"GPTFORGE_GPU": "cuda", **env}
    r = sh(script, "--dry-run", *args, **env)
    assert r.returncode != 0
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0], r.stderr


# ---------------------------------------------------------------------------------------- gpu_check.sh


def test_gpu_check_dry_run_runs_every_step_on_the_cpu(tmp_path, char_data):
    """scripts/gpu_check.sh --dry-run: tests/gpu (skipped here), the sweep, the FSDP2 run under torchrun and the
    one table, end to end with tiny settings; the JSON of each run is consistent with itself."""
    env = clean_env(GPTFORGE_CHECK_OUT=str(tmp_path), GPTFORGE_CHECK_DATA=str(char_data), PYTHON=sys.executable,
                    GPTFORGE_CACHE=os.environ["GPTFORGE_CACHE"])
    r = subprocess.run(["bash", str(SCRIPTS / "gpu_check.sh"), "--dry-run"], capture_output=True, text=True, env=env,
                       stdin=subprocess.DEVNULL, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "skipped" in r.stdout  # tests/gpu ran (and skipped: no GPU)
    table = r.stdout[r.stdout.index("device: "):].splitlines()
    assert table[1].split()[:8] == ["run", "mb", "prec", "cmp", "ckpt", "ms/step", "spread", "tokens/s"]
    assert [ln.split()[0] for ln in table[2:4]] == ["small", "llama-1b-fsdp"]
    sweep = json.loads((tmp_path / "small.json").read_text())
    single = json.loads((tmp_path / "llama-1b.json").read_text())["result"]
    assert sweep["micro_batch"] == 8 and sweep["best"]["micro_batch"] == 8
    for row, mb in ((sweep["best"], 8), (single, 4)):
        assert row["tokens_per_step"] == mb * 64  # micro-batch x context
        assert row["tokens_per_s"] == pytest.approx(row["tokens_per_step"] / (row["step_ms"] / 1000))
        assert len(row["step_times_ms"]) == 2 and min(row["step_times_ms"]) <= row["step_ms"] <= max(row["step_times_ms"])
        assert row["spread_ms"] >= 0 and 0 < row["mfu"] < 1
        assert row["peak_memory_kind"] == "peak RSS" and row["peak_memory_bytes"] > 100 * 2**20
        assert row["data_wait_ms"] is None or row["data_wait_ms"] >= 0
        assert "(cpu," in row["device"]
    assert "--parallel.strategy=fsdp" in single["command"]
    # step 4: time to a loss, GPT-2's block and recipe against the defaults, on the same data
    to_loss = json.loads((tmp_path / "small_to_loss.json").read_text())
    assert len(to_loss["rows"]) == 2 and to_loss["target_loss"] == pytest.approx(to_loss["rows"][0]["final_loss"])
    assert "--model.arch=gpt2" in to_loss["rows"][0]["command"] and "--train.optimizer=adamw" in to_loss["rows"][0]["command"]
    assert all(math.isfinite(r["final_loss"]) and len(r["val_curve"]) >= 2 for r in to_loss["rows"])
    wait_col = [ln.split()[-1] for ln in table[2:4]]
    assert wait_col == [("-" if r_["data_wait_ms"] is None else "ms") for r_ in (sweep["best"], single)]


def test_gpu_check_without_a_gpu_stops_at_once_with_one_line(tmp_path):
    """Without --dry-run and no GPU visible (hidden here even on a GPU machine), scripts/gpu_check.sh does not run
    tests/gpu (all skipped) and then train 124M on the CPU: one line on stderr, exit 2, nothing written."""
    out = tmp_path / "out"
    env = clean_env(GPTFORGE_CHECK_OUT=str(out), PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="",
                    HIP_VISIBLE_DEVICES="", ROCR_VISIBLE_DEVICES="", GPTFORGE_CACHE=os.environ["GPTFORGE_CACHE"])
    r = subprocess.run(["bash", str(SCRIPTS / "gpu_check.sh")], capture_output=True, text=True, env=env,
                       stdin=subprocess.DEVNULL, timeout=60)
    assert (r.returncode, r.stdout) == (2, ""), r.stdout[-2000:] + r.stderr[-2000:]
    assert r.stderr.splitlines() == [
        "gpu_check.sh: error: no GPU visible to PyTorch (torch.cuda.is_available() is False); run it on a machine "
        "with a GPU (check CUDA_VISIBLE_DEVICES / HIP_VISIBLE_DEVICES and the driver), or with --dry-run to check "
        "the wiring on the CPU"], r.stderr
    assert not out.exists()
