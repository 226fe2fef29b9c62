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

Preemption: a pod being stopped (eviction, node drain, preemption, job deletion) gets SIGTERM; torchrun
passes it to its workers, which finish the step, save a checkpoint and exit within train.grace_s
(gptforge.train.preempt). The pods' terminationGracePeriodSeconds is train.grace_s + GRACE_MARGIN, so
the kubelet's SIGKILL comes after that; torchrun waits train.grace_s + 10 s. The training command gets
``--train.resume=auto`` (unless it sets a resume), so a replacement pod continues from the checkpoint, and
the Job's podFailurePolicy does not count such disruptions against backoffLimit (a crash still does).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Annotated, ClassVar, Literal

import tyro
import yaml

from gptforge.errors import UserError
from gptforge.launch.jobfile import ELASTIC_SIGNALS, check_train_command, parse_env, shutdown_timeout, \
    train_grace_s, with_resume, write_output
from gptforge.launch.node import DEFAULT_PORT, MasterPort, NodeSpec, check_iface_name, check_port, gptforge_target
from gptforge.options import Passthrough

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
GPU_RESOURCE = {"nvidia": "nvidia.com/gpu", "amd": "amd.com/gpu", "none": None}
PROG = "k8s"
GRACE_MARGIN = 30  # seconds of terminationGracePeriodSeconds beyond train.grace_s (torchrun's end, slack)


@dataclasses.dataclass
class K8sOptions:
    """Write Kubernetes manifests: an Indexed Job + headless Service, or a Kubeflow PyTorchJob. Everything
    after '--' is the gptforge training command, e.g. -- pretrain --model.preset=small"""

    error_prefix: ClassVar[str] = "k8s: "

    kind: Literal["job", "pytorchjob"] = "job"
    """manifest kind"""
    name: str = "gptforge"
    """job name; also the Service name"""
    namespace: str | None = None
    """namespace (default: kubectl's current one)"""
    image: str | None = None
    """container image (default gptforge:rocm for --gpu amd, else gptforge:cuda)"""
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    nnodes: Annotated[int, tyro.conf.arg(aliases=["--nodes"])] = 2
    """number of nodes = pods"""
    gpus_per_node: int = 1
    """GPUs per pod, one worker each"""
    nproc_per_node: int | None = None
    """workers per pod (default: GPUs per pod, 1 without GPUs)"""
    gpu: Literal["nvidia", "amd", "none"] = "nvidia"
    """GPU resource: nvidia.com/gpu, amd.com/gpu, or none"""
    cpu: str | None = None
    """CPU request and limit per pod, e.g. 16"""
    memory: str | None = None
    """memory request and limit per pod, e.g. 128Gi"""
    shm_size: str = "16Gi"
    """size of the /dev/shm memory volume"""
    master_port: MasterPort = DEFAULT_PORT
    """rendezvous port on pod 0 (alias --port)"""
    iface: str | None = None
    """network interface for NCCL/Gloo inside the pod (e.g. eth0)"""
    no_ib: bool = False
    """no InfiniBand: NCCL_IB_DISABLE=1"""
    env: Annotated[list[str], tyro.conf.UseAppendAction] = dataclasses.field(default_factory=list)
    """container variable NAME=VALUE (repeatable)"""
    pvc: str | None = None
    """PersistentVolumeClaim (ReadWriteMany) mounted at --pvc-mount for data and runs"""
    pvc_mount: str = "/workspace"
    """where the claim is mounted"""
    backoff_limit: int = 0
    """retries of the whole job"""
    deadline: int | None = None
    """activeDeadlineSeconds: stop the job after this long"""
    out: str | None = None
    """write the manifests to FILE (default: stdout)"""
    command: Passthrough = dataclasses.field(default_factory=list)


def _check(opts: K8sOptions) -> int:
    check_train_command(opts.command, PROG, "--nnodes 2")
    if not _DNS_LABEL.match(opts.name) or len(opts.name) > 63 - 1 - len(str(max(opts.nnodes - 1, 0))):
        raise UserError(
            f"{PROG}: --name '{opts.name}' must be a DNS label: lower-case letters, digits and '-', "
            "starting and ending with a letter or digit, short enough for '<name>-<index>' (63 characters)"
        )
    if opts.namespace is not None and not _DNS_LABEL.match(opts.namespace):
        raise UserError(f"{PROG}: --namespace '{opts.namespace}' must be a DNS label (lower-case, digits, '-')")
    if opts.nnodes < 1:
        raise UserError(f"{PROG}: --nnodes {opts.nnodes} must be at least 1")
    if opts.gpus_per_node < 0:
        raise UserError(f"{PROG}: --gpus-per-node {opts.gpus_per_node} must be 0 or more")
    if opts.gpu == "none" and opts.gpus_per_node > 0 and opts.nproc_per_node is None:
        opts.gpus_per_node = 0
    nproc = opts.nproc_per_node if opts.nproc_per_node is not None else max(1, opts.gpus_per_node)
    if nproc < 1:
        raise UserError(f"{PROG}: --nproc-per-node {nproc} must be at least 1")
    if opts.image is None:
        opts.image = "gptforge:rocm" if opts.gpu == "amd" else "gptforge:cuda"
    if not opts.image or any(c.isspace() for c in opts.image):
        raise UserError(f"{PROG}: --image '{opts.image}' must be an image reference without spaces")
    for opt in ("cpu", "memory", "shm_size"):
        value = getattr(opts, opt)
        if value is not None and not _QUANTITY.match(value):
            raise UserError(f"{PROG}: --{opt.replace('_', '-')} '{value}' is not a Kubernetes quantity (e.g. 16, 500m, 64Gi)")
    if opts.pvc is not None and not re.match(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", opts.pvc):
        raise UserError(f"{PROG}: --pvc '{opts.pvc}' is not a valid claim name")
    if not opts.pvc_mount.startswith("/"):
        raise UserError(f"{PROG}: --pvc-mount '{opts.pvc_mount}' must be an absolute path")
    if opts.backoff_limit < 0:
        raise UserError(f"{PROG}: --backoff-limit must be 0 or more")
    if opts.deadline is not None and opts.deadline < 1:
        raise UserError(f"{PROG}: --deadline must be a positive number of seconds")
    check_port(opts.master_port, f"{PROG}: ")
    check_iface_name(opts.iface, f"{PROG}: ")
    return nproc


def node_spec(opts: K8sOptions, nproc: int, rdzv: str) -> NodeSpec:
    """Pod ``JOB_COMPLETION_INDEX`` is the node rank; pod 0 (hostname <job>-0, subdomain = the Service) the master."""
    return NodeSpec(nnodes=opts.nnodes, node_rank="$(JOB_COMPLETION_INDEX)", nproc_per_node=nproc,
                    master_addr=f"{opts.name}-0.{opts.name}", master_port=opts.master_port, iface=opts.iface,
                    no_ib=opts.no_ib, rdzv=rdzv)


def _stop_env(grace: float) -> list[dict]:
    """torchrun passes SIGTERM/SIGUSR1 to the workers and gives them their grace period before it kills them."""
    return [{"name": "PET_SIGNALS_TO_HANDLE", "value": ELASTIC_SIGNALS},
            {"name": "TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "value": str(shutdown_timeout(grace))}]


def termination_grace(grace: float) -> int:
    return math.ceil(grace) + GRACE_MARGIN


def _container(opts: K8sOptions, spec: NodeSpec, command: list[str], extra_env: list[dict]) -> dict:
    env = [*extra_env, *({"name": k, "value": v} for k, v in spec.network_env().items())]
    env += _stop_env(train_grace_s(opts.command))
    env += [{"name": k, "value": v} for k, v in parse_env(opts.env, PROG)]
    limits: dict[str, str] = {}
    requests: dict[str, str] = {}
    resource = GPU_RESOURCE[opts.gpu]
    if resource and opts.gpus_per_node > 0:
        limits[resource] = str(opts.gpus_per_node)
    if opts.cpu:
        limits["cpu"] = requests["cpu"] = opts.cpu
    if opts.memory:
        limits["memory"] = requests["memory"] = opts.memory
    mounts = [{"name": "dshm", "mountPath": "/dev/shm"}]
    if opts.pvc:
        mounts.append({"name": "workspace", "mountPath": opts.pvc_mount})
    c: dict = {
        "name": "pytorch" if opts.kind == "pytorchjob" else "trainer",
        "image": opts.image,
        "imagePullPolicy": opts.image_pull_policy,
        "command": command[:1],
        "args": command[1:],
        "workingDir": "/workspace",
        "ports": [{"name": "pytorchjob-port" if opts.kind == "pytorchjob" else "rendezvous",
                   "containerPort": opts.master_port, "protocol": "TCP"}],
    }
    if env:
        c["env"] = env
    if limits or requests:
        c["resources"] = {k: v for k, v in (("requests", requests), ("limits", limits)) if v}
    c["volumeMounts"] = mounts
    return c


def _volumes(opts: K8sOptions) -> list[dict]:
    vols: list[dict] = [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": opts.shm_size}}]
    if opts.pvc:
        vols.append({"name": "workspace", "persistentVolumeClaim": {"claimName": opts.pvc}})
    return vols


def _meta(opts: K8sOptions, **extra) -> dict:
    m: dict = {"name": opts.name}
    if opts.namespace:
        m["namespace"] = opts.namespace
    m["labels"] = {"app.kubernetes.io/name": "gptforge", "app.kubernetes.io/instance": opts.name}
    m.update(extra)
    return m


def indexed_job(opts: K8sOptions, nproc: int, train: list[str]) -> list[dict]:
    labels = {"app.kubernetes.io/name": "gptforge", "app.kubernetes.io/instance": opts.name}
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(opts),
        "spec": {
            "clusterIP": "None",  # headless: DNS names for the pods, no load balancing
            "publishNotReadyAddresses": True,  # pod 0's name resolves as soon as it has an address
            "selector": labels,
            "ports": [{"name": "rendezvous", "port": opts.master_port, "targetPort": opts.master_port, "protocol": "TCP"}],
        },
    }
    spec = node_spec(opts, nproc, "static")
    master = spec.master_addr
    command = spec.torchrun_argv(gptforge_target(with_resume(train)))
    env = [
        {"name": "NODE_RANK", "valueFrom": {"fieldRef": {
            "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}},
        {"name": "NNODES", "value": str(opts.nnodes)},
        {"name": "MASTER_ADDR", "value": master},
        {"name": "MASTER_PORT", "value": str(opts.master_port)},
    ]
    job_spec: dict = {
        "completionMode": "Indexed",
        "completions": opts.nnodes,
        "parallelism": opts.nnodes,
        "backoffLimit": opts.backoff_limit,
        # a pod stopped by the cluster (preemption, eviction, drain) saved a checkpoint: replace it, uncounted
        "podFailurePolicy": {"rules": [{"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}]},
    }
    if opts.deadline:
        job_spec["activeDeadlineSeconds"] = opts.deadline
    job_spec["template"] = {
        "metadata": {"labels": dict(labels)},
        "spec": {
            "subdomain": opts.name,
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": termination_grace(train_grace_s(train)),
            "containers": [_container(opts, spec, command, env)],
            "volumes": _volumes(opts),
        },
    }
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": _meta(opts), "spec": job_spec}
    return [service, job]


def pytorchjob(opts: K8sOptions, nproc: int, train: list[str]) -> list[dict]:
    # The training operator sets PET_NNODES/PET_NPROC_PER_NODE/PET_NODE_RANK/PET_MASTER_ADDR/
    # PET_MASTER_PORT (from the port named pytorchjob-port); torchrun reads PET_* as its defaults.
    spec = node_spec(opts, nproc, "operator")
    command = spec.torchrun_argv(gptforge_target(with_resume(train)))

    def replica(n: int) -> dict:
        return {
            "replicas": n,
            "restartPolicy": "Never",
            "template": {
                "metadata": {"labels": {"app.kubernetes.io/name": "gptforge", "app.kubernetes.io/instance": opts.name}},
                "spec": {"terminationGracePeriodSeconds": termination_grace(train_grace_s(train)),
                         "containers": [_container(opts, spec, command, [])], "volumes": _volumes(opts)},
            },
        }

    specs = {"Master": replica(1)}
    if opts.nnodes > 1:
        specs["Worker"] = replica(opts.nnodes - 1)
    run_policy: dict = {"cleanPodPolicy": "None", "backoffLimit": opts.backoff_limit}
    if opts.deadline:
        run_policy["activeDeadlineSeconds"] = opts.deadline
    return [{
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": _meta(opts),
        "spec": {"nprocPerNode": str(nproc), "runPolicy": run_policy, "pytorchReplicaSpecs": specs},
    }]


def render(opts: K8sOptions) -> str:
    nproc = _check(opts)
    make = pytorchjob if opts.kind == "pytorchjob" else indexed_job
    header = "# Generated by gptforge k8s. Apply with: kubectl apply -f FILE\n"
    return header + yaml.safe_dump_all(make(opts, nproc, opts.command), sort_keys=False, default_flow_style=False,
                                       width=1000)


def main(opts: K8sOptions) -> int:
    write_output(render(opts), opts.out, submit_hint="apply with: kubectl apply -f")
    return 0
