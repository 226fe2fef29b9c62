#!/usr/bin/env bash
# Check this node before a multi-node run: runs `gptforge doctor` inside the same image and network
# setup as scripts/docker_run_ddp.sh (host network, GPU devices, interface env).
#   scripts/docker_test_network.sh 10.0.0.1 eth0       # on every node, same master address
# The node rank is 0 when master_addr is one of this machine's addresses, else 1; NODE_RANK overrides.
# Extra doctor arguments go after "--" (e.g. --timeout 60, an alias of --wait). Environment: NNODES (2), MASTER_PORT (29500), NODE_RANK,
# plus those of scripts/docker_run.sh.
set -euo pipefail
# shellcheck source=SCRIPTDIR/../docker/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../docker/common.sh"

USAGE="$PROG [--dry-run] <master_addr> [iface=eth0] [-- doctor args]"
parse_args "$USAGE" 1 2 "master_addr is required" "$@"
set -- "${REST[@]}"
master=${POS[0]}
iface=${POS[1]:-eth0}
nnodes=${NNODES:-2}
port=${MASTER_PORT:-29500}
valid_host "$master" || usage_error "$USAGE" "master_addr '$master' is not an address or host name"
valid_iface "$iface" || usage_error "$USAGE" "iface '$iface' is not an interface name (see 'ip -br addr')"
valid_port "$port" || usage_error "$USAGE" "MASTER_PORT='$port' must be in 1..65535"
is_uint "$nnodes" && [ "$nnodes" -ge 1 ] || usage_error "$USAGE" "NNODES='$nnodes' must be a positive integer"

if [ -n "${NODE_RANK:-}" ]; then
  rank=$NODE_RANK
  is_uint "$rank" && [ "$rank" -lt "$nnodes" ] || usage_error "$USAGE" "NODE_RANK='$rank' must be an integer in 0..$((nnodes - 1))"
elif [ "$master" = localhost ] || [ "$master" = "$(hostname)" ] ||
  ip -o addr show 2>/dev/null | awk '{print $4}' | cut -d/ -f1 | grep -qxF "$master"; then
  rank=0
else
  rank=1
fi

vendor=$(detect_gpu)
gpu_docker_args "$vendor"
volume_args

node_args "$rank" "$nnodes" "$master" "$port" "$iface"
cmd=(docker run --rm --name "gptforge-doctor$rank" --network host "${GPU_ARGS[@]}" "${NODE_ENV[@]}"
  "${VOLUME_ARGS[@]}" "$(image_for "$vendor")" gptforge doctor "${NODE_FLAGS[@]}" "$@")
run_cmd "${cmd[@]}"
