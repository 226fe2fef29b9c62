"""`gptforge k8s`: write Kubernetes manifests for a multi-node run.

    gptforge k8s --nnodes 2 --gpus-per-node 8 --image registry/gptforge:cuda --out job.yaml -- pretrain --model.preset=small
    kubectl apply -f job.yaml

Two kinds:
- `job` (default, plain Kubernetes): an Indexed Job with one pod per node (completionMode Indexed,
  parallelism = completions = nnodes) and a headless Service. The pod index (JOB_COMPLETION_INDEX)
  is the node rank; pod 0 is reachable as `<name>-0.<name>` (hostname + subdomain) and hosts the
  torchrun rendezvous.
- `pytorchjob`: a Kubeflow PyTorchJob (training operator); the operator sets the rendezvous
  environment (PET_NNODES, PET_NODE_RANK, PET_MASTER_ADDR, ...) that torchrun reads.
"""

from __future__ import annotations

import argparse
import re

import yaml

from gptforge.errors import UserError
from gptforge.launch.slurm import _Parser, check_iface, check_port, parse_cli, parse_env, write_output

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
GPU_RESOURCE = {"nvidia": "nvidia.com/gpu", "amd": "amd.com/gpu", "none": None}
PROG = "k8s"


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="gptforge k8s",
        description="Write Kubernetes manifests: an Indexed Job + headless Service, or a Kubeflow PyTorchJob.",
        epilog="Everything after '--' is the gptforge training command, e.g. -- pretrain --model.preset=small",
    )
    p.add_argument("--kind", choices=("job", "pytorchjob"), default="job", help="manifest kind (default job)")
    p.add_argument("--name", default="gptforge", help="job name; also the Service name (default gptforge)")
    p.add_argument("--namespace", default=None, help="namespace (default: kubectl's current one)")
    p.add_argument("--image", default=None, help="container image (default gptforge:rocm for --gpu amd, else gptforge:cuda)")
    p.add_argument("--image-pull-policy", choices=("Always", "IfNotPresent", "Never"), default="IfNotPresent")
    p.add_argument("--nnodes", type=int, default=2, help="number of nodes = pods (default 2)")
    p.add_argument("--gpus-per-node", type=int, default=1, help="GPUs per pod, one worker each (default 1)")
    p.add_argument("--nproc-per-node", type=int, default=None, help="workers per pod (default: GPUs per pod, 1 without GPUs)")
    p.add_argument("--gpu", choices=tuple(GPU_RESOURCE), default="nvidia",
                   help="GPU resource: nvidia.com/gpu, amd.com/gpu, or none (default nvidia)")
    p.add_argument("--cpu", default=None, help="CPU request and limit per pod, e.g. 16")
    p.add_argument("--memory", default=None, help="memory request and limit per pod, e.g. 128Gi")
    p.add_argument("--shm-size", default="16Gi", help="size of the /dev/shm memory volume (default 16Gi)")
    p.add_argument("--port", type=int, default=29500, help="rendezvous port on pod 0 (default 29500)")
    p.add_argument("--iface", default=None, help="network interface for NCCL/Gloo inside the pod (e.g. eth0)")
    p.add_argument("--no-ib", action="store_true", help="no InfiniBand: NCCL_IB_DISABLE=1")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="container variable (repeatable)")
    p.add_argument("--pvc", default=None,
                   help="PersistentVolumeClaim (ReadWriteMany) mounted at --pvc-mount for data and runs")
    p.add_argument("--pvc-mount", default="/workspace", help="where the claim is mounted (default /workspace)")
    p.add_argument("--backoff-limit", type=int, default=0, help="retries of the whole job (default 0)")
    p.add_argument("--deadline", type=int, default=None, help="activeDeadlineSeconds: stop the job after this long")
    p.add_argument("--out", default=None, help="write the manifests to FILE (default: stdout)")
    return p


def _check(args: argparse.Namespace) -> int:
    if not _DNS_LABEL.match(args.name) or len(args.name) > 63 - 1 - len(str(max(args.nnodes - 1, 0))):
        raise UserError(
            f"{PROG}: --name '{args.name}' must be a DNS label: lower-case letters, digits and '-', "
            "starting and ending with a letter or digit, short enough for '<name>-<index>' (63 characters)"
        )
    if args.namespace is not None and not _DNS_LABEL.match(args.namespace):
        raise UserError(f"{PROG}: --namespace '{args.namespace}' must be a DNS label (lower-case, digits, '-')")
    if args.nnodes < 1:
        raise UserError(f"{PROG}: --nnodes {args.nnodes} must be at least 1")
    if args.gpus_per_node < 0:
        raise UserError(f"{PROG}: --gpus-per-node {args.gpus_per_node} must be 0 or more")
    if args.gpu == "none" and args.gpus_per_node > 0 and args.nproc_per_node is None:
        args.gpus_per_node = 0
    nproc = args.nproc_per_node if args.nproc_per_node is not None else max(1, args.gpus_per_node)
    if nproc < 1:
        raise UserError(f"{PROG}: --nproc-per-node {nproc} must be at least 1")
    if args.image is None:
        args.image = "gptforge:rocm" if args.gpu == "amd" else "gptforge:cuda"
    if not args.image or any(c.isspace() for c in args.image):
        raise UserError(f"{PROG}: --image '{args.image}' must be an image reference without spaces")
    for opt in ("cpu", "memory", "shm_size"):
        value = getattr(args, opt)
        if value is not None and not _QUANTITY.match(value):
            raise UserError(f"{PROG}: --{opt.replace('_', '-')} '{value}' is not a Kubernetes quantity (e.g. 16, 500m, 64Gi)")
    if args.pvc is not None and not re.match(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", args.pvc):
        raise UserError(f"{PROG}: --pvc '{args.pvc}' is not a valid claim name")
    if not args.pvc_mount.startswith("/"):
        raise UserError(f"{PROG}: --pvc-mount '{args.pvc_mount}' must be an absolute path")
    if args.backoff_limit < 0:
        raise UserError(f"{PROG}: --backoff-limit must be 0 or more")
    if args.deadline is not None and args.deadline < 1:
        raise UserError(f"{PROG}: --deadline must be a positive number of seconds")
    check_port(args.port, PROG)
    check_iface(args.iface, PROG)
    return nproc


def _container(args, nproc: int, command: list[str], extra_env: list[dict]) -> dict:
    env = list(extra_env)
    if args.iface:
        env += [{"name": "NCCL_SOCKET_IFNAME", "value": args.iface}, {"name": "GLOO_SOCKET_IFNAME", "value": args.iface}]
    if args.no_ib:
        env.append({"name": "NCCL_IB_DISABLE", "value": "1"})
    env += [{"name": k, "value": v} for k, v in parse_env(args.env, PROG)]
    limits: dict[str, str] = {}
    requests: dict[str, str] = {}
    resource = GPU_RESOURCE[args.gpu]
    if resource and args.gpus_per_node > 0:
        limits[resource] = str(args.gpus_per_node)
    if args.cpu:
        limits["cpu"] = requests["cpu"] = args.cpu
    if args.memory:
        limits["memory"] = requests["memory"] = args.memory
    mounts = [{"name": "dshm", "mountPath": "/dev/shm"}]
    if args.pvc:
        mounts.append({"name": "workspace", "mountPath": args.pvc_mount})
    c: dict = {
        "name": "pytorch" if args.kind == "pytorchjob" else "trainer",
        "image": args.image,
        "imagePullPolicy": args.image_pull_policy,
        "command": command[:1],
        "args": command[1:],
        "workingDir": "/workspace",
        "ports": [{"name": "pytorchjob-port" if args.kind == "pytorchjob" else "rendezvous",
                   "containerPort": args.port, "protocol": "TCP"}],
    }
    if env:
        c["env"] = env
    if limits or requests:
        c["resources"] = {k: v for k, v in (("requests", requests), ("limits", limits)) if v}
    c["volumeMounts"] = mounts
    return c


def _volumes(args) -> list[dict]:
    vols: list[dict] = [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": args.shm_size}}]
    if args.pvc:
        vols.append({"name": "workspace", "persistentVolumeClaim": {"claimName": args.pvc}})
    return vols


def _meta(args, **extra) -> dict:
    m: dict = {"name": args.name}
    if args.namespace:
        m["namespace"] = args.namespace
    m["labels"] = {"app.kubernetes.io/name": "gptforge", "app.kubernetes.io/instance": args.name}
    m.update(extra)
    return m


def indexed_job(args, nproc: int, train: list[str]) -> list[dict]:
    labels = {"app.kubernetes.io/name": "gptforge", "app.kubernetes.io/instance": args.name}
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(args),
        "spec": {
            "clusterIP": "None",  # headless: DNS names for the pods, no load balancing
            "publishNotReadyAddresses": True,  # pod 0's name resolves as soon as it has an address
            "selector": labels,
            "ports": [{"name": "rendezvous", "port": args.port, "targetPort": args.port, "protocol": "TCP"}],
        },
    }
    master = f"{args.name}-0.{args.name}"  # pod hostname <job>-<index>, subdomain = the Service
    command = [
        "torchrun",
        f"--nnodes={args.nnodes}",
        f"--nproc-per-node={nproc}",
        "--node-rank=$(JOB_COMPLETION_INDEX)",
        f"--master-addr={master}",
        f"--master-port={args.port}",
        "--max-restarts=0",
        "-m",
        "gptforge",
        *train,
    ]
    env = [
        {"name": "NODE_RANK", "valueFrom": {"fieldRef": {
            "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}},
        {"name": "NNODES", "value": str(args.nnodes)},
        {"name": "MASTER_ADDR", "value": master},
        {"name": "MASTER_PORT", "value": str(args.port)},
    ]
    job_spec: dict = {
        "completionMode": "Indexed",
        "completions": args.nnodes,
        "parallelism": args.nnodes,
        "backoffLimit": args.backoff_limit,
    }
    if args.deadline:
        job_spec["activeDeadlineSeconds"] = args.deadline
    job_spec["template"] = {
        "metadata": {"labels": dict(labels)},
        "spec": {
            "subdomain": args.name,
            "restartPolicy": "Never",
            "containers": [_container(args, nproc, command, env)],
            "volumes": _volumes(args),
        },
    }
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": _meta(args), "spec": job_spec}
    return [service, job]


def pytorchjob(args, nproc: int, train: list[str]) -> list[dict]:
    # The training operator sets PET_NNODES/PET_NPROC_PER_NODE/PET_NODE_RANK/PET_MASTER_ADDR/
    # PET_MASTER_PORT (from the port named pytorchjob-port); torchrun reads PET_* as its defaults.
    command = ["torchrun", "--max-restarts=0", "-m", "gptforge", *train]

    def replica(n: int) -> dict:
        return {
            "replicas": n,
            "restartPolicy": "Never",
            "template": {
                "metadata": {"labels": {"app.kubernetes.io/name": "gptforge", "app.kubernetes.io/instance": args.name}},
                "spec": {"containers": [_container(args, nproc, command, [])], "volumes": _volumes(args)},
            },
        }

    specs = {"Master": replica(1)}
    if args.nnodes > 1:
        specs["Worker"] = replica(args.nnodes - 1)
    run_policy: dict = {"cleanPodPolicy": "None", "backoffLimit": args.backoff_limit}
    if args.deadline:
        run_policy["activeDeadlineSeconds"] = args.deadline
    return [{
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": _meta(args),
        "spec": {"nprocPerNode": str(nproc), "runPolicy": run_policy, "pytorchReplicaSpecs": specs},
    }]


def render(args: argparse.Namespace, train: list[str]) -> str:
    nproc = _check(args)
    docs = pytorchjob(args, nproc, train) if args.kind == "pytorchjob" else indexed_job(args, nproc, train)
    header = "# Generated by gptforge k8s. Apply with: kubectl apply -f FILE\n"
    return header + yaml.safe_dump_all(docs, sort_keys=False, default_flow_style=False, width=1000)


def main(argv: list[str]) -> int:
    parsed = parse_cli(list(argv), build_parser(), PROG, example="--nnodes 2")
    if parsed is None:
        return 0
    args, train = parsed
    write_output(render(args, train), args.out, submit_hint="apply with: kubectl apply -f")
    return 0
