#!/usr/bin/env bash
# The torchrun equivalent of launch/deepspeed_hostfile.sh: a DeepSpeed job started by torchrun
# (one agent per node; no ssh needed). A thin layer over launch/torchrun.sh, which reads
# NNODES, NODE_RANK, NPROC_PER_NODE, MASTER_ADDR, MASTER_PORT; this script adds
#   CONFIG [configs/ds_zero2.json]  MODULE [microadam_dist.train, run with --engine deepspeed]
#   DS_ACCELERATOR [cpu when no CUDA device is visible]
# Extra arguments are passed to the module.
#
# One node, 2 processes:   launch/torchrun_deepspeed.sh --steps 100
# Two nodes (run on each): NNODES=2 NODE_RANK=<0|1> MASTER_ADDR=<node 0's address> launch/torchrun_deepspeed.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
if [ -z "${DS_ACCELERATOR:-}" ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  export DS_ACCELERATOR=cpu
fi
MODULE=${MODULE:-microadam_dist.train} PYTHON=$PY \
  exec launch/torchrun.sh --engine deepspeed --deepspeed_config "${CONFIG:-configs/ds_zero2.json}" "$@"
