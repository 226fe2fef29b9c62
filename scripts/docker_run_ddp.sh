#!/usr/bin/env bash
# One node of a multi-node DDP run in Docker (host network). Run it on every node, rank 0 first or
# not: the nodes wait for each other.
#   node 0:  scripts/docker_run_ddp.sh 0 10.0.0.1 tiny 5 eth0
#   node 1:  scripts/docker_run_ddp.sh 1 10.0.0.1 tiny 5 eth0
# Presets (1 GPU per node; effective batch 256 sequences over 2 nodes):
#   tiny 50M: micro 16 x accum 8   small 124M: 8 x 16   medium 350M: 4 x 32
# Accumulation is 256 / (micro x NNODES x GPUS_PER_NODE), so other node counts keep the batch.
# Output goes to runs/<preset>. Extra pretrain arguments go after "--"; they come last, so
# "-- --parallel.strategy=fsdp" (or auto) overrides the --parallel.strategy=ddp this script passes.
#
# What each node needs: its own disk (GPTFORGE_RUNS / GPTFORGE_DATA, default ./runs ./data here) and
# its own cache (the docker volume gptforge_cache); the image (scripts/build.sh, or GPTFORGE_IMAGE
# pulled from a registry); the data, prepared on each node from its own copy; the network interface
# the nodes share (iface, e.g. eth0: 'ip -br addr'); on node 0 an open TCP port for the rendezvous
# (MASTER_PORT, default 29500) and the ports torch picks for its process groups (open the firewall
# between the nodes, or run on a trusted network). It does NOT need a shared disk (NFS): node 0
# keeps the checkpoints, the other nodes their own files. Check the nodes first with
# scripts/docker_test_network.sh.
#
# One process per GPU: GPUS_PER_NODE (default: the GPUs given to the container: GPTFORGE_GPUS=N or
# device=0,1, else the ids in CUDA_VISIBLE_DEVICES / HIP_VISIBLE_DEVICES, else every GPU of the host).
# Environment: NNODES (2), MASTER_PORT (29500), GPUS_PER_NODE, GRAD_ACCUM (override),
# GPTFORGE_NO_IB=1 (no InfiniBand: NCCL over sockets), every NCCL_* and GLOO_* variable of this
# shell (passed into the container, e.g. NCCL_DEBUG=INFO, NCCL_IB_DISABLE=1, NCCL_SOCKET_NTHREADS),
# plus those of scripts/docker_run.sh.
set -euo pipefail
# shellcheck source=SCRIPTDIR/../docker/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../docker/common.sh"

USAGE="$PROG [--dry-run] <node_rank> <master_addr> [preset=tiny] [epochs=5] [iface=eth0] [-- pretrain args]"
parse_args "$USAGE" 2 5 "node_rank and master_addr are required" "$@"
set -- "${REST[@]}"
rank=${POS[0]}
master=${POS[1]}
preset=${POS[2]:-tiny}
epochs=${POS[3]:-5}
iface=${POS[4]:-eth0}
nnodes=${NNODES:-2}
port=${MASTER_PORT:-29500}
vendor=$(detect_gpu)
gpus=${GPUS_PER_NODE:-$(container_gpu_count "$vendor")}

is_uint "$nnodes" && [ "$nnodes" -ge 1 ] || usage_error "$USAGE" "NNODES='$nnodes' must be a positive integer"
is_uint "$rank" && [ "$rank" -lt "$nnodes" ] || usage_error "$USAGE" "node_rank '$rank' must be an integer in 0..$((nnodes - 1))"
valid_host "$master" || usage_error "$USAGE" "master_addr '$master' is not an address or host name"
is_uint "$epochs" && [ "$epochs" -ge 1 ] || usage_error "$USAGE" "epochs '$epochs' must be a positive integer"
valid_iface "$iface" || usage_error "$USAGE" "iface '$iface' is not an interface name (see 'ip -br addr')"
valid_port "$port" || usage_error "$USAGE" "MASTER_PORT='$port' must be in 1..65535"
is_uint "$gpus" && [ "$gpus" -ge 1 ] || usage_error "$USAGE" "GPUS_PER_NODE='$gpus' must be a positive integer"

case "$preset" in
  tiny) micro=16 ;;   # 50M
  small) micro=8 ;;   # 124M
  medium) micro=4 ;;  # 350M
  *) usage_error "$USAGE" "unknown preset '$preset' (tiny, small or medium)" ;;
esac
accum=${GRAD_ACCUM:-$((256 / (micro * nnodes * gpus)))}
is_uint "$accum" || usage_error "$USAGE" "GRAD_ACCUM='$accum' must be a positive integer"
[ "$accum" -ge 1 ] || accum=1

gpu_docker_args "$vendor"
volume_args

node_args "$rank" "$nnodes" "$master" "$port" "$iface"
net_env=("${NODE_ENV[@]}")
launch=(gptforge launch "${NODE_FLAGS[@]}" --nproc-per-node "$gpus")
if [ "${GPTFORGE_NO_IB:-0}" = 1 ]; then
  [ -n "${NCCL_IB_DISABLE:-}" ] || net_env+=(-e NCCL_IB_DISABLE=1)
  launch+=(--no-ib)
fi
passthrough_env NCCL_ GLOO_
net_env+=("${PASS_ENV[@]}")
launch+=(-- pretrain "--model.preset=$preset" "--parallel.strategy=ddp" "--train.micro_batch=$micro"
  "--train.grad_accum=$accum" "--train.epochs=$epochs" "--train.out_dir=runs/$preset" "$@")

cmd=(docker run --rm --name "gptforge-node$rank" --network host)
if [ -t 0 ] && [ -t 1 ]; then cmd+=(-it); fi
cmd+=("${GPU_ARGS[@]}" "${net_env[@]}" "${VOLUME_ARGS[@]}" "$(image_for "$vendor")" "${launch[@]}")
run_cmd "${cmd[@]}"
