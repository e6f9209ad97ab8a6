"""Process-group start-up in torchrun-restarted workers (microadam_dist.distributed).

torchrun's static rendezvous hands every generation of workers the same TCP store; the test plays
the agent (it hosts the store) and starts two generations of two real gloo workers on it. In the
second, rank 0 starts late, so rank 1 would find rank 0's address from the first generation (a
dead process) if both generations used the same keys.
"""

from __future__ import annotations

import os
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from microadam_dist.distributed import destroy_process_group, free_port, init_process_group


def _worker(rank: int, world_size: int, port: int, restart: int, late: float) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        TORCHELASTIC_RESTART_COUNT=str(restart),
        TORCHELASTIC_USE_AGENT_STORE="True",
    )
    if rank == 0:
        time.sleep(late)
    init_process_group("gloo", timeout=timedelta(seconds=20))  # a regression fails, not hangs
    total = torch.tensor([float(rank + 1)])
    dist.all_reduce(total)
    assert total.item() == 3.0
    destroy_process_group()


@pytest.mark.timeout(120)
def test_a_restarted_generation_does_not_read_the_previous_ones_addresses():
    port = free_port()
    agent_store = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)  # as torchrun's agent
    for restart, late in ((0, 0.0), (1, 3.0)):
        mp.start_processes(_worker, args=(2, port, restart, late), nprocs=2, join=True, start_method="spawn")
    del agent_store
