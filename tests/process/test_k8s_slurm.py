"""`gptforge slurm` and `gptforge k8s`: generated files checked offline.

- sbatch: `bash -n` + shellcheck, and executed with stand-in `scontrol`/`srun` that record what
  srun would start (the real two-node Slurm run lives in tests/integration).
- Kubernetes: `kubernetes-validate --strict` for the Job and Service; a PyTorchJob against the schema
  in tests/support/pytorchjob.schema.json, its pod templates against Kubernetes' own PodTemplate.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from gptforge import cli

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = ROOT / "tests" / "support" / "pytorchjob.schema.json"


def tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if not path:
        pytest.fail(f"{name} not found; install the dev tools: pip install -e '.[dev]'")
    return path


def gptforge(*argv: str, capsys) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


# ---------------------------------------------------------------------------------------- slurm


def sbatch(tmp_path: Path, *argv: str, capsys) -> Path:
    path = tmp_path / "job.sbatch"
    rc, out, err = gptforge("slurm", *argv[: argv.index("--")], "--out", str(path), *argv[argv.index("--") :],
                            capsys=capsys)
    assert rc == 0, err
    assert path.is_file() and os.access(path, os.X_OK)
    assert "sbatch" in err
    return path


def run_with_fake_slurm(tmp_path: Path, script: Path, port: int = 29500, nodelist: str = "gpu[07-08]") -> dict:
    """Run the batch script with stand-ins for scontrol and srun; returns srun's argv and env."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && printf "gpu07\\ngpu08\\n"\n')
    record = tmp_path / "srun.json"
    (bin_dir / "srun").write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        f"json.dump({{'argv': sys.argv[1:], 'env': dict(os.environ)}}, open({str(record)!r}, 'w'))\n"
    )
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NCCL_", "GLOO_", "MASTER_"))}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", SLURM_JOB_NODELIST=nodelist, SLURM_NNODES="2", SLURM_JOB_ID="4242")
    r = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=30)
    assert r.returncode == 0, r.stderr
    assert f"rendezvous gpu07:{port}" in r.stdout
    return json.loads(record.read_text())


def test_sbatch_default(tmp_path, capsys):
    script = sbatch(tmp_path, "--nodes", "2", "--", "pretrain", "--model.preset=tiny", capsys=capsys)
    text = script.read_text()
    assert text.startswith("#!/bin/bash\n")
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=1",
                 "#SBATCH --time=01:00:00", "#SBATCH --job-name=gptforge", "#SBATCH --output=%x-%j.out"):
        assert line in text.splitlines(), line
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1' in text
    assert "NCCL_SOCKET_IFNAME" not in text and "NCCL_IB_DISABLE" not in text
    rec = run_with_fake_slurm(tmp_path, script)
    argv = rec["argv"]
    t = argv.index("torchrun")
    assert "--ntasks-per-node=1" in argv[:t] and "--nodes=2" in argv[:t]
    assert argv[t:] == ["torchrun", "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
                        "--rdzv-endpoint=gpu07:29500", "--rdzv-id=4242", "--rdzv-conf=join_timeout=900",
                        "--max-restarts=0", "-m", "gptforge", "pretrain", "--model.preset=tiny", "--train.resume=auto"]
    assert rec["env"]["MASTER_ADDR"] == "gpu07" and rec["env"]["MASTER_PORT"] == "29500"


def test_sbatch_all_options(tmp_path, capsys):
    script = sbatch(
        tmp_path, "--nodes", "4", "--gpus-per-node", "8", "--time", "1-12:00:00", "--job-name", "llm.small",
        "--output", "logs/%x-%j.out", "--partition", "gpu", "--account", "proj1", "--cpus-per-task", "32",
        "--mem", "400G", "--port", "29600", "--iface", "enp5s0", "--no-ib", "--env", "HSA_OVERRIDE_GFX_VERSION=12.0.1",
        "--env", "NOTE=two words", "--container-image", "nvcr.io#nvidia/pytorch:25.08-py3",
        "--container-mounts", "/data:/workspace/data", "--container-workdir", "/workspace",
        "--", "pretrain", "--model.preset=small", "--data.path=data/my corpus", "--train.note=it's", capsys=capsys,
    )
    text = script.read_text()
    lines = text.splitlines()
    for line in ("#SBATCH --nodes=4", "#SBATCH --gpus-per-node=8", "#SBATCH --time=1-12:00:00",
                 "#SBATCH --job-name=llm.small", "#SBATCH --output=logs/%x-%j.out", "#SBATCH --partition=gpu",
                 "#SBATCH --account=proj1", "#SBATCH --cpus-per-task=32", "#SBATCH --mem=400G"):
        assert line in lines, line
    rec = run_with_fake_slurm(tmp_path, script, port=29600)
    argv, env = rec["argv"], rec["env"]
    t = argv.index("torchrun")
    assert "--container-image=nvcr.io#nvidia/pytorch:25.08-py3" in argv[:t]
    assert "--container-mounts=/data:/workspace/data" in argv[:t] and "--container-workdir=/workspace" in argv[:t]
    assert "--nproc-per-node=8" in argv and "--rdzv-endpoint=gpu07:29600" in argv
    # The training arguments arrive exactly as given (spaces, quotes).
    assert argv[argv.index("gptforge") + 1 :] == ["pretrain", "--model.preset=small", "--data.path=data/my corpus",
                                                  "--train.note=it's", "--train.resume=auto"]
    assert env["NCCL_SOCKET_IFNAME"] == env["GLOO_SOCKET_IFNAME"] == "enp5s0"
    assert env["NCCL_IB_DISABLE"] == "1" and env["HSA_OVERRIDE_GFX_VERSION"] == "12.0.1" and env["NOTE"] == "two words"


def test_sbatch_cpu_only(tmp_path, capsys):
    text = sbatch(tmp_path, "--gpus-per-node", "0", "--nproc-per-node", "2", "--", "pretrain", capsys=capsys).read_text()
    assert "#SBATCH --gpus-per-node" not in text and "--nproc-per-node=2" in text


@pytest.mark.parametrize("argv", [
    [],
    ["--iface", "eth0"],                        # no training command
    ["--gpus-per-node", "8", "--", "trian"],     # not a training command
    ["--nodes", "0", "--", "pretrain"],
    ["--nodes", "two", "--", "pretrain"],
    ["--time", "soon", "--", "pretrain"],
    ["--port", "0", "--", "pretrain"],
    ["--iface", "bad iface", "--", "pretrain"],
    ["--env", "1X=2", "--", "pretrain"],
    ["--job-name", "a b", "--", "pretrain"],
    ["--output", "a b.out", "--", "pretrain"],
    ["--container-mounts", "/a:/b", "--", "pretrain"],
    ["--bogus", "--", "pretrain"],
])
def test_slurm_bad_arguments(argv, capsys):
    rc, out, err = gptforge("slurm", *argv, capsys=capsys)
    assert rc == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("gptforge: error: slurm: "), err


def test_generated_sbatch_is_shellcheck_clean(tmp_path, capsys):
    variants = [
        ["--", "pretrain"],
        ["--nodes", "3", "--gpus-per-node", "4", "--iface", "ib0", "--no-ib", "--env", "A=b c",
         "--container-image", "img:1", "--container-mounts", "/x:/y", "--", "sft", "--data.path=x y"],
    ]
    shellcheck = tool("shellcheck")
    for i, v in enumerate(variants):
        path = tmp_path / f"v{i}.sbatch"
        rc, _, err = gptforge("slurm", *v[: v.index("--")], "--out", str(path), *v[v.index("--") :], capsys=capsys)
        assert rc == 0, err
        assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
        r = subprocess.run([shellcheck, str(path)], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stdout


def test_slurm_stdout(capsys):
    rc, out, _ = gptforge("slurm", "--", "pretrain", capsys=capsys)
    assert rc == 0 and out.startswith("#!/bin/bash\n#SBATCH")


# ---------------------------------------------------------------------------------------- k8s


def k8s(*argv: str, capsys) -> list[dict]:
    rc, out, err = gptforge("k8s", *argv, capsys=capsys)
    assert rc == 0, err
    return [d for d in yaml.safe_load_all(out) if d]


def kubernetes_validate(tmp_path: Path, docs: list[dict], name: str = "m.yaml") -> subprocess.CompletedProcess:
    path = tmp_path / name
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return subprocess.run([tool("kubernetes-validate"), "--strict", str(path)], capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize("gpu,resource", [("nvidia", "nvidia.com/gpu"), ("amd", "amd.com/gpu")])
def test_indexed_job(tmp_path, capsys, gpu, resource):
    docs = k8s("--nnodes", "3", "--gpus-per-node", "8", "--gpu", gpu, "--name", "llm-run", "--namespace", "ml",
               "--iface", "eth0", "--no-ib", "--cpu", "32", "--memory", "256Gi", "--pvc", "shared",
               "--env", "HSA_OVERRIDE_GFX_VERSION=12.0.1", "--deadline", "7200",
               "--", "pretrain", "--model.preset=small", "--data.path=data/my corpus", capsys=capsys)
    r = kubernetes_validate(tmp_path, docs)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("passed") == 2, r.stdout
    service, job = docs
    assert service["kind"] == "Service" and job["kind"] == "Job"
    # Headless Service for the rendezvous, selecting the job's pods.
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["ports"][0]["port"] == 29500
    pod = job["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == 3
    assert spec["backoffLimit"] == 0 and spec["activeDeadlineSeconds"] == 7200
    assert pod["spec"]["subdomain"] == service["metadata"]["name"] == "llm-run"
    assert pod["spec"]["restartPolicy"] == "Never"
    (c,) = pod["spec"]["containers"]
    assert c["image"] == ("gptforge:rocm" if gpu == "amd" else "gptforge:cuda")
    cmd = c["command"] + c["args"]
    assert cmd == ["torchrun", "--nnodes=3", "--nproc-per-node=8", "--node-rank=$(JOB_COMPLETION_INDEX)",
                   "--master-addr=llm-run-0.llm-run", "--master-port=29500", "--max-restarts=0", "-m", "gptforge",
                   "pretrain", "--model.preset=small", "--data.path=data/my corpus", "--train.resume=auto"]
    env = {e["name"]: e for e in c["env"]}
    assert "job-completion-index" in env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert env["NCCL_SOCKET_IFNAME"]["value"] == env["GLOO_SOCKET_IFNAME"]["value"] == "eth0"
    assert env["NCCL_IB_DISABLE"]["value"] == "1" and env["HSA_OVERRIDE_GFX_VERSION"]["value"] == "12.0.1"
    assert c["resources"]["limits"][resource] == "8"
    other = "amd.com/gpu" if gpu == "nvidia" else "nvidia.com/gpu"
    assert other not in c["resources"]["limits"]
    vols = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert vols["dshm"]["emptyDir"]["medium"] == "Memory"
    assert vols["workspace"]["persistentVolumeClaim"]["claimName"] == "shared"
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert mounts["/dev/shm"] == "dshm" and mounts["/workspace"] == "workspace"


def test_indexed_job_cpu_and_validator_is_strict(tmp_path, capsys):
    docs = k8s("--gpu", "none", "--nnodes", "2", "--", "pretrain", capsys=capsys)
    c = docs[1]["spec"]["template"]["spec"]["containers"][0]
    assert "resources" not in c and "--nproc-per-node=1" in c["args"]
    assert kubernetes_validate(tmp_path, docs).returncode == 0
    # Sanity: the validator rejects an unknown field, so a pass above means something.
    bad = copy.deepcopy(docs)
    bad[1]["spec"]["template"]["spec"]["containers"][0]["gpus"] = 1
    assert kubernetes_validate(tmp_path, bad, "bad.yaml").returncode != 0


def _pytorchjob_validator():
    from jsonschema import Draft202012Validator

    schema = json.loads(SCHEMA.read_text())
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def _pod_templates(job: dict) -> list[dict]:
    """Each replica's pod template as a core/v1 PodTemplate, which kubernetes-validate knows."""
    return [{"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"{job['metadata']['name']}-{role.lower()}"},
             "template": spec["template"]} for role, spec in job["spec"]["pytorchReplicaSpecs"].items()]


@pytest.mark.parametrize("nnodes", [1, 4])
def test_pytorchjob(tmp_path, capsys, nnodes):
    (job,) = k8s("--kind", "pytorchjob", "--nnodes", str(nnodes), "--gpus-per-node", "8", "--gpu", "amd",
                 "--iface", "eth0", "--pvc", "shared", "--", "pretrain", "--model.preset=small", capsys=capsys)
    validator = _pytorchjob_validator()
    errors = [e.message for e in validator.iter_errors(job)]
    assert not errors, errors
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1
    if nnodes == 1:
        assert "Worker" not in replicas
    else:
        assert replicas["Worker"]["replicas"] == nnodes - 1
    assert job["spec"]["nprocPerNode"] == "8"
    c = replicas["Master"]["template"]["spec"]["containers"][0]
    assert c["name"] == "pytorch" and c["command"] + c["args"] == [
        "torchrun", "--max-restarts=0", "-m", "gptforge", "pretrain", "--model.preset=small", "--train.resume=auto"]
    assert c["resources"]["limits"]["amd.com/gpu"] == "8"
    assert c["ports"][0]["name"] == "pytorchjob-port"
    r = kubernetes_validate(tmp_path, _pod_templates(job))
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("passed") == len(replicas)


def test_pytorchjob_schema_rejects_mistakes(capsys):
    (job,) = k8s("--kind", "pytorchjob", "--", "pretrain", capsys=capsys)
    validator = _pytorchjob_validator()
    assert validator.is_valid(job)
    mistakes = []
    j = copy.deepcopy(job); j["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["name"] = "main"
    mistakes.append(j)
    j = copy.deepcopy(job); j["spec"]["nprocPerNode"] = 1
    mistakes.append(j)
    j = copy.deepcopy(job); j["spec"]["pytorchReplicaSpecs"]["Chief"] = j["spec"]["pytorchReplicaSpecs"]["Worker"]
    mistakes.append(j)
    j = copy.deepcopy(job); j["spec"]["runPolicy"]["cleanPodPolicy"] = "Never"
    mistakes.append(j)
    j = copy.deepcopy(job); j["apiVersion"] = "kubeflow.org/v2"
    mistakes.append(j)
    j = copy.deepcopy(job); j["spec"]["pytorchReplicaSpecs"]["Master"]["replicas"] = 2
    mistakes.append(j)
    for m in mistakes:
        assert not validator.is_valid(m)


def test_k8s_out_file(tmp_path, capsys):
    path = tmp_path / "job.yaml"
    rc, out, err = gptforge("k8s", "--out", str(path), "--", "pretrain", capsys=capsys)
    assert rc == 0 and out == "" and "kubectl apply -f" in err
    assert [d["kind"] for d in yaml.safe_load_all(path.read_text())] == ["Service", "Job"]


@pytest.mark.parametrize("argv", [
    [],
    ["--nnodes", "2"],
    ["--", "chat"],
    ["--name", "Bad_Name", "--", "pretrain"],
    ["--namespace", "ML", "--", "pretrain"],
    ["--nnodes", "0", "--", "pretrain"],
    ["--gpus-per-node", "-1", "--", "pretrain"],
    ["--shm-size", "lots", "--", "pretrain"],
    ["--memory", "12 GB", "--", "pretrain"],
    ["--kind", "mpijob", "--", "pretrain"],
    ["--gpu", "intel", "--", "pretrain"],
    ["--iface", "bad/if", "--", "pretrain"],
    ["--env", "NOEQUALS", "--", "pretrain"],
    ["--pvc-mount", "relative", "--pvc", "x", "--", "pretrain"],
    ["--port", "99999", "--", "pretrain"],
])
def test_k8s_bad_arguments(argv, capsys):
    rc, out, err = gptforge("k8s", *argv, capsys=capsys)
    assert rc == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("gptforge: error: k8s: "), err


# ---------------------------------------------------------------------------------------- preemption


def test_sbatch_preemption_lines(tmp_path, capsys):
    lines = sbatch(tmp_path, "--", "pretrain", capsys=capsys).read_text().splitlines()
    for line in ("#SBATCH --signal=B:USR1@90", "#SBATCH --requeue", "#SBATCH --open-mode=append",
                 "export PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
                 "export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=40", "trap 'stop USR1' USR1", "trap 'stop TERM' TERM"):
        assert line in lines, line
    # the grace period comes from the training command; a resume it chooses is kept, not doubled
    (tmp_path / "g").mkdir()
    text = sbatch(tmp_path / "g", "--no-requeue", "--", "pretrain", "--train.grace_s=100", "--train.resume=none",
                  capsys=capsys).read_text()
    assert "#SBATCH --signal=B:USR1@160" in text and "TORCH_ELASTIC_SHUTDOWN_TIMEOUT=110" in text
    assert "#SBATCH --requeue" not in text and "scontrol requeue" not in text
    assert "--train.resume=none" in text and "--train.resume=auto" not in text


@pytest.mark.parametrize("sig,requeued", [("USR1", True), ("TERM", False)])
def test_sbatch_trap_passes_signal_and_requeues(tmp_path, capsys, sig, requeued):
    """The batch script for real (bash), with stand-ins for srun (records the signals it gets, then exits
    like torchrun after its workers saved) and scontrol (records its arguments): SIGUSR1 reaches srun and
    the job is requeued after srun ended; SIGTERM reaches srun and nothing is requeued."""
    script = sbatch(tmp_path, "--", "pretrain", capsys=capsys)
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    (bin_dir / "scontrol").write_text(
        f'#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && {{ printf "gpu07\\ngpu08\\n"; exit 0; }}\n'
        f'echo "scontrol $*" >> {log}\n')
    (bin_dir / "srun").write_text(
        f"#!{sys.executable}\nimport signal, sys, time\n"
        f"def got(s, f):\n    open({str(log)!r}, 'a').write(f'srun got {{signal.Signals(s).name}}\\n')\n"
        f"    time.sleep(0.5)\n    sys.exit(1)\n"
        "signal.signal(signal.SIGUSR1, got); signal.signal(signal.SIGTERM, got)\n"
        f"open({str(log)!r}, 'a').write('srun started\\n')\ntime.sleep(60)\nsys.exit(0)\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NCCL_", "GLOO_", "MASTER_"))}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", SLURM_JOB_NODELIST="gpu[07-08]", SLURM_NNODES="2",
               SLURM_JOB_ID="4242")
    p = subprocess.Popen(["bash", str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         cwd=tmp_path, start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while not (log.exists() and "srun started" in log.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert log.exists(), "srun never started"
        p.send_signal(getattr(signal, "SIG" + sig))
        out, err = p.communicate(timeout=20)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    calls = log.read_text().splitlines()
    assert f"srun got SIG{sig}" in calls, (calls, out, err)
    assert (calls[-1] == "scontrol requeue 4242") == requeued, calls
    assert ("requeueing it" in out) == requeued, out
    assert p.returncode == 1, (p.returncode, out, err)  # srun's own status


def test_k8s_preemption(tmp_path, capsys):
    for kind in ("job", "pytorchjob"):
        rc, out, err = gptforge("k8s", "--kind", kind, "--", "pretrain", "--train.grace_s=45", capsys=capsys)
        assert rc == 0, err
        docs = list(yaml.safe_load_all(out))
        pods = [d["spec"]["template"]["spec"] for d in docs if d["kind"] == "Job"] or \
            [r["template"]["spec"] for d in docs for r in d["spec"]["pytorchReplicaSpecs"].values()]
        for pod in pods:
            assert pod["terminationGracePeriodSeconds"] == 45 + 30
            (c,) = pod["containers"]
            env = {e["name"]: e.get("value") for e in c["env"]}
            assert env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == "55"
            assert env["PET_SIGNALS_TO_HANDLE"] == "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
            assert (c["command"] + c["args"])[-1] == "--train.resume=auto"
        if kind == "job":
            (job,) = [d for d in docs if d["kind"] == "Job"]
            assert job["spec"]["podFailurePolicy"] == {
                "rules": [{"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}]}
    rc, out, err = gptforge("k8s", "--", "pretrain", capsys=capsys)
    assert "terminationGracePeriodSeconds: 60" in out  # default train.grace_s 30 + 30
