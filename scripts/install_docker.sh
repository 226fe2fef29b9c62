#!/usr/bin/env bash
# Set up Docker for gptforge on Ubuntu/Debian (run as root, e.g. with sudo):
#   1. Docker Engine + buildx + compose plugin from Docker's apt repository
#   2. the user joins the "docker" group (log out and in again afterwards)
#   3. NVIDIA: the NVIDIA container toolkit, registered with Docker
#      ROCm:   the user joins "video"/"render", udev rules make /dev/kfd and /dev/dri/renderD* group-accessible
#   4. a GPU check from a container (the vendor's PyTorch base image that scripts/build.sh builds on)
# The GPU driver itself (amdgpu/ROCm or the NVIDIA driver) must already be installed on the host.
#   sudo scripts/install_docker.sh [--dry-run] [--user NAME] [--skip-check]
# --dry-run prints the steps instead of running them. GPTFORGE_GPU=rocm|cuda|none overrides detection.
set -euo pipefail
# shellcheck source=SCRIPTDIR/../docker/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../docker/common.sh"

USAGE="$PROG [--dry-run] [--user NAME] [--skip-check]"
user=${SUDO_USER:-}
check=1
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1; shift ;;
    --user)
      [ $# -ge 2 ] && [ -n "$2" ] || usage_error "$USAGE" "--user needs a value"
      user=$2; shift 2 ;;
    --skip-check) check=0; shift ;;
    -h | --help) echo "usage: $USAGE"; exit 0 ;;
    *) usage_error "$USAGE" "unknown argument '$1'" ;;
  esac
done
if [ -n "$user" ] && [ "$DRY_RUN" = 0 ]; then
  id "$user" >/dev/null 2>&1 || die "no such user '$user'; pass an existing one with --user NAME"
fi

os_release=${OS_RELEASE_FILE:-/etc/os-release}
[ -r "$os_release" ] || die "cannot read $os_release; this script supports Ubuntu and Debian only"
# shellcheck disable=SC1090
os_id=$(. "$os_release" && echo "${ID:-}")
# shellcheck disable=SC1090
codename=$(. "$os_release" && echo "${VERSION_CODENAME:-}")
case "$os_id" in
  ubuntu | debian) ;;
  *) die "unsupported distribution '$os_id'; this script supports Ubuntu and Debian (see https://docs.docker.com/engine/install/)" ;;
esac
[ -n "$codename" ] || die "no VERSION_CODENAME in $os_release; cannot pick Docker's apt repository"
if [ "$DRY_RUN" = 0 ] && [ "$(id -u)" != 0 ]; then
  die "must run as root: sudo $0 $*"
fi

if [ "${GPTFORGE_GPU:-}" = none ]; then
  vendor=none
elif [ -n "${GPTFORGE_GPU:-}" ]; then
  vendor=$(detect_gpu)
elif [ -e /dev/kfd ] || command -v rocm-smi >/dev/null 2>&1 || command -v nvidia-smi >/dev/null 2>&1; then
  vendor=$(detect_gpu)
else
  echo "$PROG: no GPU driver found (no /dev/kfd, rocm-smi, nvidia-smi): installing Docker only; set GPTFORGE_GPU=rocm|cuda to force" >&2
  vendor=none
fi

n=0
step() { # step "what" "shell command": print it (--dry-run) or run it, stopping at the first failure
  n=$((n + 1))
  if [ "$DRY_RUN" = 1 ]; then
    printf '# %d. %s\n%s\n' "$n" "$1" "$2"
  else
    printf '==> %d. %s\n' "$n" "$1" >&2
    bash -euo pipefail -c "$2" || die "step $n ($1) failed: $2"
  fi
}

restart_docker='if command -v systemctl >/dev/null && systemctl is-system-running >/dev/null 2>&1; then systemctl restart docker; else service docker restart; fi'

step "prerequisites" "apt-get update && apt-get install -y ca-certificates curl gnupg"
step "Docker's apt key" "install -m 0755 -d /etc/apt/keyrings && curl -fsSL https://download.docker.com/linux/$os_id/gpg -o /etc/apt/keyrings/docker.asc && chmod a+r /etc/apt/keyrings/docker.asc"
step "Docker's apt repository" "echo \"deb [arch=\$(dpkg --print-architecture) signed-by=/etc/apt/keyrings/docker.asc] https://download.docker.com/linux/$os_id $codename stable\" > /etc/apt/sources.list.d/docker.list"
step "Docker Engine, buildx and compose" "apt-get update && apt-get install -y docker-ce docker-ce-cli containerd.io docker-buildx-plugin docker-compose-plugin"
step "start Docker" "if command -v systemctl >/dev/null && systemctl is-system-running >/dev/null 2>&1; then systemctl enable --now docker; else service docker start; fi"
if [ -n "$user" ]; then
  step "user $user in the docker group" "usermod -aG docker $user"
else
  echo "$PROG: note: no user given (--user NAME, or run through sudo): nobody is added to the docker group" >&2
fi

case "$vendor" in
  cuda)
    step "NVIDIA container toolkit apt key and repository" "curl -fsSL https://nvidia.github.io/libnvidia-container/gpgkey | gpg --dearmor --yes -o /usr/share/keyrings/nvidia-container-toolkit-keyring.gpg && curl -fsSL https://nvidia.github.io/libnvidia-container/stable/deb/nvidia-container-toolkit.list | sed 's#deb https://#deb [signed-by=/usr/share/keyrings/nvidia-container-toolkit-keyring.gpg] https://#g' > /etc/apt/sources.list.d/nvidia-container-toolkit.list"
    step "NVIDIA container toolkit" "apt-get update && apt-get install -y nvidia-container-toolkit"
    step "register the NVIDIA runtime with Docker" "nvidia-ctk runtime configure --runtime=docker && $restart_docker"
    check_cmd="docker run --rm --gpus all --ipc host IMAGE python -c 'import torch; assert torch.cuda.is_available(), \"no GPU in the container\"; print(torch.cuda.get_device_name(0))'"
    ;;
  rocm)
    if [ -n "$user" ]; then
      step "user $user in the video and render groups (GPU device access)" "getent group render >/dev/null || groupadd --system render; usermod -aG video,render $user"
    fi
    step "device permissions for /dev/kfd and /dev/dri/renderD*" "getent group render >/dev/null || groupadd --system render; printf '%s\n' 'KERNEL==\"kfd\", GROUP=\"render\", MODE=\"0660\"' 'SUBSYSTEM==\"drm\", KERNEL==\"renderD*\", GROUP=\"render\", MODE=\"0660\"' > /etc/udev/rules.d/70-gptforge-amdgpu.rules && (udevadm control --reload-rules && udevadm trigger || true)"
    check_cmd="docker run --rm --device=/dev/kfd --device=/dev/dri --group-add video --group-add \$(getent group render | cut -d: -f3) --ipc host --security-opt seccomp=unconfined IMAGE python -c 'import torch; assert torch.cuda.is_available(), \"no GPU in the container\"; print(torch.cuda.get_device_name(0))'"
    ;;
  none) check=0 ;;
esac

if [ "$check" = 1 ]; then
  base=$(sed -n 's/^ARG BASE_IMAGE=//p' "$GPTFORGE_ROOT/docker/Dockerfile.$vendor")
  [ -n "$base" ] || die "no BASE_IMAGE in docker/Dockerfile.$vendor"
  step "GPU check from a container ($base; large download, reused by scripts/build.sh)" "${check_cmd//IMAGE/$base}"
fi
if [ "$DRY_RUN" = 0 ]; then
  echo "$PROG: done. Log out and in again (or 'newgrp docker') for the group changes, then: scripts/build.sh" >&2
fi
