#!/usr/bin/env bash
# Launch the main job (or MODULE) with mpirun; ranks are discovered through mpi4py.
#
# Reads: NP [2] processes, HOSTFILE [none] an MPI hostfile, MODULE [microadam_dist.train],
#        MPIRUN [the project's .venv/bin/mpirun, from the `mpi` extra, else mpirun on PATH],
#        MASTER_ADDR / MASTER_PORT [rank 0's address and a free port, broadcast over MPI].
# As root, Open MPI needs --allow-run-as-root; past the core count it needs --oversubscribe.
#
#   launch/mpirun.sh --steps 100
#   NP=8 HOSTFILE=hosts.txt launch/mpirun.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
MPIRUN=${MPIRUN:-$( [ -x .venv/bin/mpirun ] && echo .venv/bin/mpirun || echo mpirun )}
extra=()
[ "$(id -u)" = 0 ] && extra+=(--allow-run-as-root)
extra+=(--oversubscribe)
[ -n "${HOSTFILE:-}" ] && extra+=(--hostfile "$HOSTFILE")
exec "$MPIRUN" -np "${NP:-2}" "${extra[@]}" "$PY" -m microadam_dist.mpi -m "${MODULE:-microadam_dist.train}" "$@"
