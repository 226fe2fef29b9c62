# shellcheck shell=bash
# Shared by scripts/*.sh (sourced, never run): GPU vendor detection, the docker flags each vendor
# needs, and --dry-run printing. Everything here is plain bash and side-effect free until run_cmd.

GPTFORGE_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PROG=$(basename "$0")
DRY_RUN=0

die() { # one-line error, non-zero exit
  echo "$PROG: error: $*" >&2
  exit 2
}

usage_error() { # $1: usage line, $2: what was wrong
  echo "$PROG: error: $2; usage: $1" >&2
  exit 2
}

# parse_args USAGE MIN MAX MISSING "$@": --dry-run / --help / MIN..MAX positional arguments (MISSING is
# the error when fewer are given); sets DRY_RUN, POS (the positional arguments) and REST (after "--").
parse_args() {
  local usage=$1 min=$2 max=$3 missing=$4
  shift 4
  POS=()
  REST=()
  while [ $# -gt 0 ]; do
    case "$1" in
      --dry-run) DRY_RUN=1; shift ;;
      -h | --help) echo "usage: $usage"; exit 0 ;;
      --) shift; REST=("$@"); break ;;
      -*) usage_error "$usage" "unknown option '$1'" ;;
      *) POS+=("$1"); shift ;;
    esac
  done
  [ ${#POS[@]} -ge "$min" ] || usage_error "$usage" "$missing"
  [ ${#POS[@]} -le "$max" ] || usage_error "$usage" "too many arguments"
}

# Prints the command as one shell-quoted line (the exact command, copy-pasteable) with --dry-run,
# otherwise runs it in place of this script.
run_cmd() {
  if [ "$DRY_RUN" = 1 ]; then
    local out
    printf -v out '%q ' "$@"
    echo "${out% }"
    return 0
  fi
  exec "$@"
}

# rocm | cuda. GPTFORGE_GPU overrides detection.
detect_gpu() {
  local v=${GPTFORGE_GPU:-}
  if [ -n "$v" ]; then
    case "$v" in
      rocm | cuda) echo "$v"; return 0 ;;
      *) die "GPTFORGE_GPU='$v' is not a GPU vendor; set GPTFORGE_GPU=rocm or GPTFORGE_GPU=cuda" ;;
    esac
  fi
  if [ -e /dev/kfd ] || command -v rocm-smi >/dev/null 2>&1; then
    echo rocm
  elif command -v nvidia-smi >/dev/null 2>&1; then
    echo cuda
  else
    die "no GPU found (no /dev/kfd, rocm-smi or nvidia-smi); install the driver, or set GPTFORGE_GPU=rocm|cuda"
  fi
}

# Fills the array GPU_ARGS with the docker run flags for vendor $1.
gpu_docker_args() {
  local vendor=$1 render
  GPU_ARGS=()
  if [ "$vendor" = rocm ]; then
    # Device groups must carry the host's gid (the render gid differs between distributions).
    render=$(getent group render 2>/dev/null | cut -d: -f3 || true)
    GPU_ARGS+=(--device=/dev/kfd --device=/dev/dri --group-add video --group-add "${render:-render}"
      --security-opt seccomp=unconfined --cap-add SYS_PTRACE)
    if [ -n "${HSA_OVERRIDE_GFX_VERSION:-}" ]; then GPU_ARGS+=(-e "HSA_OVERRIDE_GFX_VERSION=$HSA_OVERRIDE_GFX_VERSION"); fi
    if [ -n "${HIP_VISIBLE_DEVICES:-}" ]; then GPU_ARGS+=(-e "HIP_VISIBLE_DEVICES=$HIP_VISIBLE_DEVICES"); fi
  else
    GPU_ARGS+=(--gpus "${GPTFORGE_GPUS:-all}")
    if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then GPU_ARGS+=(-e "CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES"); fi
  fi
  # PyTorch DataLoader workers and NCCL/RCCL need shared memory; pinned memory needs memlock.
  GPU_ARGS+=(--ipc host --shm-size "${GPTFORGE_SHM:-16g}" --ulimit memlock=-1 --ulimit stack=67108864)
}

# Fills VOLUME_ARGS: data, runs and a cache volume shared with the compose files.
volume_args() {
  local data=${GPTFORGE_DATA:-$GPTFORGE_ROOT/data} runs=${GPTFORGE_RUNS:-$GPTFORGE_ROOT/runs}
  # Created here so they belong to the user, not to root (docker would create them as root).
  [ "$DRY_RUN" = 1 ] || mkdir -p "$data" "$runs"
  # shellcheck disable=SC2034  # used by the scripts that source this file
  VOLUME_ARGS=(-v "$data:/workspace/data" -v "$runs:/workspace/runs" -v gptforge_cache:/cache -w /workspace)
}

# node_args RANK NNODES MASTER PORT IFACE: fills NODE_ENV (docker -e: the rendezvous and interface
# variables, for tools in the container) and NODE_FLAGS (the node flags of `gptforge launch` and
# `gptforge doctor`, which render NCCL_SOCKET_IFNAME etc. themselves: gptforge.launch.node).
node_args() {
  # shellcheck disable=SC2034  # used by the scripts that source this file
  NODE_ENV=(-e "NODE_RANK=$1" -e "NNODES=$2" -e "MASTER_ADDR=$3" -e "MASTER_PORT=$4"
    -e "NCCL_SOCKET_IFNAME=$5" -e "GLOO_SOCKET_IFNAME=$5")
  # shellcheck disable=SC2034
  NODE_FLAGS=(--nnodes "$2" --node-rank "$1" --master-addr "$3" --master-port "$4" --iface "$5")
}

# passthrough_env PREFIX...: fills PASS_ENV with "-e NAME=value" for every variable of this shell whose
# name starts with one of the prefixes (e.g. NCCL_ GLOO_), sorted; the interface variables node_args
# sets (NCCL_SOCKET_IFNAME, GLOO_SOCKET_IFNAME) are left to it.
passthrough_env() {
  local name prefix
  PASS_ENV=()
  while IFS= read -r name; do
    for prefix in "$@"; do
      case "$name" in
        NCCL_SOCKET_IFNAME | GLOO_SOCKET_IFNAME) ;;
        "$prefix"*) PASS_ENV+=(-e "$name=${!name}") ;;
      esac
    done
  done < <(compgen -e | LC_ALL=C sort)
}

# container_gpu_count VENDOR: the GPUs the container gets (one process each). GPTFORGE_GPUS=N or
# "device=0,1" (CUDA --gpus), else the ids in CUDA_VISIBLE_DEVICES / HIP_VISIBLE_DEVICES, else every GPU of
# this host (nvidia-smi -L; ROCm: the KFD topology nodes with a gpu_id), else 1.
container_gpu_count() {
  local ids=${CUDA_VISIBLE_DEVICES:-${HIP_VISIBLE_DEVICES:-}} n=0 f
  if is_uint "${GPTFORGE_GPUS:-}" && [ "$GPTFORGE_GPUS" -ge 1 ]; then
    echo "$GPTFORGE_GPUS"
    return
  fi
  if [[ ${GPTFORGE_GPUS:-} =~ ^\"?device=([0-9,]+)\"?$ ]]; then ids=${BASH_REMATCH[1]}; fi
  if [ -n "$ids" ]; then
    n=$(($(tr -cd , <<<"$ids" | wc -c) + 1))
  elif [ "$1" = cuda ] && command -v nvidia-smi >/dev/null 2>&1; then
    n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  elif [ "$1" = rocm ]; then
    for f in /sys/class/kfd/kfd/topology/nodes/*/gpu_id; do
      if [ -r "$f" ] && [ "$(cat "$f")" != 0 ]; then n=$((n + 1)); fi
    done
  fi
  if [ "$n" -ge 1 ]; then echo "$n"; else echo 1; fi
}

image_for() { echo "${GPTFORGE_IMAGE:-gptforge:$1}"; }

is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }

valid_iface() { [[ $1 =~ ^[A-Za-z0-9_.:@-]{1,15}$ ]]; }

valid_host() { [[ $1 =~ ^[A-Za-z0-9]([A-Za-z0-9_.:-]*[A-Za-z0-9])?$ ]]; }

valid_port() { is_uint "$1" && [ "$1" -ge 1 ] && [ "$1" -le 65535 ]; }
