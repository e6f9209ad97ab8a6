#!/usr/bin/env bash
# Launch a DeepSpeed job with the `deepspeed` launcher and a hostfile (one node or several).
#
# Reads the environment (defaults in brackets):
#   HOSTFILE [launch/hostfile.sample]   MASTER_ADDR [127.0.0.1]   MASTER_PORT [29500]
#   CONFIG [configs/ds_zero2.json]      MODULE [microadam_dist.train, run with --engine deepspeed]
#   DS_ACCELERATOR [cpu when no CUDA device is visible]
#   NO_SSH [unset]: set to 1 to start each node yourself (run this script on every node with
#                   NODE_RANK=<its index in the hostfile>), as DeepSpeed's --no_ssh does
# Extra arguments are passed to the module.
#
#   launch/deepspeed_hostfile.sh --steps 100
#   HOSTFILE=hosts.txt MASTER_ADDR=node-a CONFIG=configs/ds_zero3.json launch/deepspeed_hostfile.sh
#
# Several nodes: the launcher reaches them through pdsh/ssh (passwordless), and every node needs
# this checkout at the same path; or use NO_SSH=1 as above. A hostfile naming only this machine
# needs no ssh at all. On CPU-only machines the processes talk over gloo.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
if [ -z "${DS_ACCELERATOR:-}" ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  export DS_ACCELERATOR=cpu
fi
HOSTFILE=${HOSTFILE:-launch/hostfile.sample}
extra=()
hosts=$(grep -v '^[[:space:]]*#' "$HOSTFILE" | awk 'NF {print $1}' | sort -u)
if [ -n "${NO_SSH:-}" ]; then
  extra+=(--no_ssh --node_rank "${NODE_RANK:?NO_SSH needs NODE_RANK}")
elif [ "$(echo "$hosts" | wc -l)" = 1 ] && { [ "$hosts" = localhost ] || [ "$hosts" = 127.0.0.1 ] || [ "$hosts" = "$(hostname)" ]; }; then
  extra+=(--no_ssh_check)  # one node, this one: DeepSpeed launches locally, no ssh needed
fi
exec "$PY" -m deepspeed.launcher.runner \
  --hostfile "$HOSTFILE" "${extra[@]}" \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" \
  --master_port "${MASTER_PORT:-29500}" \
  --module "${MODULE:-microadam_dist.train}" \
  --engine deepspeed --deepspeed_config "${CONFIG:-configs/ds_zero2.json}" "$@"
