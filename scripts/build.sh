#!/usr/bin/env bash
# Build the gptforge image for this machine's GPU vendor (docker/Dockerfile.rocm or .cuda).
#   scripts/build.sh                       # -> gptforge:rocm or gptforge:cuda
#   scripts/build.sh --dry-run             # print the docker build command only
#   scripts/build.sh -- --no-cache         # extra docker build arguments after "--"
# Environment: GPTFORGE_GPU=rocm|cuda (default: detected), GPTFORGE_IMAGE (tag), PIP_INDEX_URL and
# PIP_TRUSTED_HOST (PyPI mirror), GPTFORGE_EXTRAS (e.g. hf), GPTFORGE_BASE_IMAGE (another vendor tag).
set -euo pipefail
# shellcheck source=SCRIPTDIR/../docker/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../docker/common.sh"

USAGE="$PROG [--dry-run] [-- docker build args]"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) echo "usage: $USAGE"; exit 0 ;;
    --) shift; break ;;
    *) usage_error "$USAGE" "unknown argument '$1'" ;;
  esac
done

vendor=$(detect_gpu)
# The image user gets the host user's ids so bind-mounted data/ and runs/ stay writable.
uid=$(id -u)
gid=$(id -g)
if [ "$uid" = 0 ]; then uid=1000; gid=1000; fi

cmd=(docker build -f "$GPTFORGE_ROOT/docker/Dockerfile.$vendor" -t "$(image_for "$vendor")"
  --build-arg "USER_UID=$uid" --build-arg "USER_GID=$gid")
if [ -n "${PIP_INDEX_URL:-}" ]; then cmd+=(--build-arg "PIP_INDEX_URL=$PIP_INDEX_URL"); fi
if [ -n "${PIP_TRUSTED_HOST:-}" ]; then cmd+=(--build-arg "PIP_TRUSTED_HOST=$PIP_TRUSTED_HOST"); fi
if [ -n "${GPTFORGE_EXTRAS:-}" ]; then cmd+=(--build-arg "EXTRAS=$GPTFORGE_EXTRAS"); fi
if [ -n "${GPTFORGE_BASE_IMAGE:-}" ]; then cmd+=(--build-arg "BASE_IMAGE=$GPTFORGE_BASE_IMAGE"); fi
cmd+=("$@" "$GPTFORGE_ROOT")
run_cmd "${cmd[@]}"
