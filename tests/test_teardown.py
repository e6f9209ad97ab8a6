"""Process teardown: no gloo worker thread may outlive ``distributed.destroy_process_group``.

A gloo group's worker threads run until the group object is freed (``dist.destroy_process_group``
only unregisters it). If they are still there at interpreter teardown, a worker that releases a
finished collective's tensor aborts the process (``terminate called without an active
exception``, about 1 run in 5 of the main job before the fix). Which run aborts is chance; whether
threads survive the teardown is not, so these tests count them: real FSDP2 training with DCP
checkpoints, a real DeepSpeed engine, then the package's teardown, on 2 gloo ranks.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from microadam_dist.distributed import destroy_process_group, free_port, gloo_worker_threads


def _fsdp_run(tmp: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from microadam_dist import MicroAdam

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 3))
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = MicroAdam(model.parameters(), lr=1e-3, block_size=64, quant_bucket_size=16)
    for _ in range(2):
        model(torch.randn(4, 16)).sum().backward()
        opt.step()
        opt.zero_grad()
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=os.path.join(tmp, "ckpt"))


def _deepspeed_run(tmp: str) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from microadam_dist import deepspeed_zero

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 3))
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "zero_optimization": {"stage": 2},
        "zero_allow_untested_optimizer": True,
        "optimizer": {"type": "MicroAdam", "params": {"lr": 1e-3}},
    }
    engine, *_ = deepspeed_zero.initialize(model, config)
    for _ in range(2):
        engine.backward(engine(torch.randn(2, 16)).sum())
        engine.step()
    engine.save_checkpoint(os.path.join(tmp, "ds"))
    engine.destroy()  # DeepSpeed's autograd hooks hold the engine until then


def _worker(rank: int, world_size: int, port: int, body: str, tmp: str, queue) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    globals()[body](tmp)
    before = gloo_worker_threads()
    destroy_process_group()
    queue.put((rank, before, gloo_worker_threads()))


@pytest.mark.timeout(240)
@pytest.mark.parametrize("body", ["_fsdp_run", "_deepspeed_run"])
def test_no_gloo_thread_outlives_the_teardown(tmp_path, body):
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(
        _worker, args=(2, free_port(), body, str(tmp_path), queue), nprocs=2, join=True, start_method="spawn"
    )
    counts = sorted(queue.get() for _ in range(2))
    for rank, before, after in counts:
        assert before > 0, f"rank {rank}: the run started no gloo worker thread, so it proves nothing"
        assert after == 0, f"rank {rank}: {after} gloo worker threads survived destroy_process_group"
