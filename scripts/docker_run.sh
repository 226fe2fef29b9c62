#!/usr/bin/env bash
# Run gptforge in its GPU container on this machine: an interactive shell, or one command.
#   scripts/docker_run.sh                                     # interactive bash in the container
#   scripts/docker_run.sh gptforge pretrain --model.preset=tiny
#   scripts/docker_run.sh --dry-run gptforge pretrain         # print the docker command only
# Environment: GPTFORGE_GPU=rocm|cuda (default: detected), GPTFORGE_IMAGE (default gptforge:<gpu>),
# GPTFORGE_DATA / GPTFORGE_RUNS (host folders, default ./data ./runs), GPTFORGE_SHM (default 16g),
# HSA_OVERRIDE_GFX_VERSION (ROCm consumer cards), GPTFORGE_GPUS (CUDA --gpus value, default all).
set -euo pipefail
# shellcheck source=SCRIPTDIR/../docker/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../docker/common.sh"

USAGE="$PROG [--dry-run] [--name NAME] [--] [command ...]"
name=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1; shift ;;
    --name)
      [ $# -ge 2 ] && [ -n "$2" ] || usage_error "$USAGE" "--name needs a value"
      name=$2; shift 2 ;;
    -h | --help) echo "usage: $USAGE"; exit 0 ;;
    --) shift; break ;;
    -*) usage_error "$USAGE" "unknown option '$1'" ;;
    *) break ;;
  esac
done

vendor=$(detect_gpu)
gpu_docker_args "$vendor"
volume_args

cmd=(docker run --rm)
if [ $# -eq 0 ]; then
  cmd+=(-it)
  set -- bash
elif [ -t 0 ] && [ -t 1 ]; then
  cmd+=(-it)
fi
if [ -n "$name" ]; then cmd+=(--name "$name"); fi
cmd+=("${GPU_ARGS[@]}" "${VOLUME_ARGS[@]}" "$(image_for "$vendor")" "$@")
run_cmd "${cmd[@]}"
