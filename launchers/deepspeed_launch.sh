#!/usr/bin/env bash
# Multi-node training with the DeepSpeed launcher and ZeRO.
#
# With ssh between nodes, run once on the first node:
#   HOSTFILE=launchers/hostfile.example ZERO_STAGE=3 launchers/deepspeed_launch.sh
# Without ssh (containers, or several "nodes" on one machine), run on every node with
# its NODE_RANK:
#   HOSTFILE=hostfile NODE_RANK=0 MASTER_ADDR=node0 launchers/deepspeed_launch.sh
#
# Extra arguments are config overrides (key=value) passed to nrd_dist.train.
set -euo pipefail

CONFIG="${CONFIG:-configs/fmnist_demo.yaml}"   # training config
HOSTFILE="${HOSTFILE:-hostfile}"                # "host slots=N" per line
ZERO_STAGE="${ZERO_STAGE:-2}"                   # engine.zero_stage: 0, 1, 2 or 3
NUM_NODES="${NUM_NODES:-$(grep -cv '^\s*\(#\|$\)' "$HOSTFILE")}"  # nodes used (default: hosts in HOSTFILE)
NUM_GPUS="${NUM_GPUS:-1}"                       # processes per node
NODE_RANK="${NODE_RANK:-}"                      # set: launch this node only, no ssh
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"         # address of the node with rank 0
MASTER_PORT="${MASTER_PORT:-29500}"             # its port
DEEPSPEED="${DEEPSPEED:-deepspeed}"             # the launcher executable

node_args=()
if [[ -n "$NODE_RANK" ]]; then
    node_args=(--no_ssh --node_rank "$NODE_RANK")
fi

exec "$DEEPSPEED" \
    --hostfile "$HOSTFILE" \
    --num_nodes "$NUM_NODES" \
    --num_gpus "$NUM_GPUS" \
    "${node_args[@]}" \
    --master_addr "$MASTER_ADDR" \
    --master_port "$MASTER_PORT" \
    --module nrd_dist.train "$CONFIG" \
    engine.backend=deepspeed "engine.zero_stage=$ZERO_STAGE" "$@"
