"""Run a module under mpirun / mpiexec: MPI finds the ranks, torch.distributed does the talking.

    mpirun -np 4 python -m microadam_dist.mpi -m microadam_dist.train --steps 100

mpi4py gives each process its rank, the world size and (from a shared-memory split of the
communicator) its local rank; rank 0 broadcasts its address and a free port for the rendezvous.
They become torch.distributed's usual environment (RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), then the module runs as ``python -m`` would run it.
torch's CPU build has no MPI backend, so the processes then talk over gloo (or NCCL on GPUs).
MASTER_ADDR / MASTER_PORT already set in the environment win over the discovered ones.
"""

from __future__ import annotations

import argparse
import os
import runpy
import socket
import sys


def discover_environment() -> dict[str, str]:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    rank0 = None
    if comm.Get_rank() == 0:
        addr = os.environ.get("MASTER_ADDR") or socket.gethostbyname(socket.gethostname())
        port = os.environ.get("MASTER_PORT")
        if not port:
            with socket.socket() as s:
                s.bind(("", 0))
                port = str(s.getsockname()[1])
        rank0 = (addr, port)
    addr, port = comm.bcast(rank0, root=0)
    env = {
        "RANK": str(comm.Get_rank()),
        "WORLD_SIZE": str(comm.Get_size()),
        "LOCAL_RANK": str(local.Get_rank()),
        "LOCAL_WORLD_SIZE": str(local.Get_size()),
        "MASTER_ADDR": addr,
        "MASTER_PORT": port,
    }
    local.Free()
    return env


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", dest="module", required=True, help="the module to run, as with python -m")
    args, rest = ap.parse_known_args(argv)
    os.environ.update(discover_environment())
    sys.argv = [args.module, *rest]
    runpy.run_module(args.module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
