#!/usr/bin/env bash
# Launch the main job (or any module) with torchrun, on one node or several.
#
# Reads the usual environment (defaults for one node in brackets):
#   NNODES [1]  NODE_RANK [0]  NPROC_PER_NODE [2]  MASTER_ADDR [127.0.0.1]  MASTER_PORT [29500]
#   MODULE [microadam_dist.train]    extra arguments are passed to the module
#
# One node, 2 processes:   launch/torchrun.sh --steps 100
# Two nodes (run on each): NNODES=2 NODE_RANK=<0|1> MASTER_ADDR=<node 0's address> launch/torchrun.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
exec "$PY" -m torch.distributed.run \
  --nnodes "${NNODES:-1}" \
  --node-rank "${NODE_RANK:-0}" \
  --nproc-per-node "${NPROC_PER_NODE:-2}" \
  --master-addr "${MASTER_ADDR:-127.0.0.1}" \
  --master-port "${MASTER_PORT:-29500}" \
  -m "${MODULE:-microadam_dist.train}" "$@"
