"""Run a function on N real processes joined by a gloo process group on 127.0.0.1."""

import os

import torch.distributed as dist
import torch.multiprocessing as mp

from microadam_dist.distributed import destroy_process_group, free_port


def _entry(rank, world_size, port, fn, args):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    fn(rank, world_size, *args)
    destroy_process_group()  # the package's teardown: a barrier, then every group's threads joined


def run_workers(fn, world_size: int, *args) -> None:
    """fn(rank, world_size, *args) on world_size spawned processes; raises if any fails."""
    mp.start_processes(
        _entry, args=(world_size, free_port(), fn, args), nprocs=world_size, join=True, start_method="spawn"
    )
