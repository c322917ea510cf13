#!/usr/bin/env bash
# Elastic multi-node training with torchrun and a c10d rendezvous.
# Run the same command on every node; nodes may join and leave between NNODES' bounds.
#
#   CONFIG=configs/webvision_rn50.yaml NNODES=2:4 RDZV_ENDPOINT=node0:29400 \
#       launchers/torchrun_multinode.sh data.train='s3://bucket/webvision/train-{000000..000131}.tar'
#
# Extra arguments are config overrides (key=value) passed to nrd_dist.train.
set -euo pipefail

CONFIG="${CONFIG:-configs/fmnist_demo.yaml}"         # training config
NNODES="${NNODES:-1:2}"                               # nodes, MIN:MAX for elastic membership
NPROC_PER_NODE="${NPROC_PER_NODE:-auto}"              # processes per node (auto: one per GPU, else per CPU)
RDZV_ENDPOINT="${RDZV_ENDPOINT:-${MASTER_ADDR:-127.0.0.1}:${MASTER_PORT:-29400}}"  # host:port of the rendezvous
RDZV_ID="${RDZV_ID:-nrd-${USER:-job}}"                # job id shared by all nodes
MAX_RESTARTS="${MAX_RESTARTS:-3}"                     # worker-group restarts before the job fails
PYTHON="${PYTHON:-python}"                            # interpreter with nrd_dist installed

exec "$PYTHON" -m torch.distributed.run \
    --nnodes "$NNODES" \
    --nproc-per-node "$NPROC_PER_NODE" \
    --rdzv-backend c10d \
    --rdzv-endpoint "$RDZV_ENDPOINT" \
    --rdzv-id "$RDZV_ID" \
    --max-restarts "$MAX_RESTARTS" \
    -m nrd_dist.train "$CONFIG" "$@"
