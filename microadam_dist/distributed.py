"""Starting the default process group, safely also in workers that torchrun restarted.

torchrun's default (static) rendezvous keeps one TCP store for the whole job and hands it to
every generation of workers, and ``init_process_group`` keys its address exchange by the same
names each time. A worker group restarted after a failure (``--max-restarts``) can then read the
addresses of the dead workers: its peers connect to closed ports ("Connection refused") or hang
in ``init_process_group`` (seen here in about one restart in four, torch 2.13, gloo; upstream:
pytorch/pytorch#135712). Each generation therefore gets its own key prefix, from
``TORCHELASTIC_RESTART_COUNT``, which every agent increments when it restarts its workers.
"""

from __future__ import annotations

import os
import socket
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.constants import default_pg_timeout


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_process_group(backend: str | None = None, timeout: timedelta | None = None) -> None:
    """``dist.init_process_group`` from the launcher's environment (torchrun, the deepspeed
    launcher, ``microadam_dist.mpi``), with a per-restart store namespace under torchrun.
    ``timeout``: the group's (and the store's) timeout, torch's default when None."""
    backend = backend or default_backend()
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        dist.init_process_group(backend, timeout=timeout)
        return
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent_store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                                is_master=False, timeout=timeout or default_pg_timeout)
    store = dist.PrefixStore(f"microadam_dist/restart_{attempt}", agent_store)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (for a rendezvous started right after)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def torchrun_command(nproc: int, args: list[str], *, module: str = "microadam_dist.train",
                     restarts: int = 0, host: str = "127.0.0.1") -> list[str]:
    """The command that runs ``python -m module *args`` on ``nproc`` local processes under
    torchrun, with its rendezvous on a free port of ``host``."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--max-restarts", str(restarts), "--master-addr", host, "--master-port", str(free_port(host)),
            "-m", module, *args]
