"""Every collective the package issues is valid for its group, and ranks agree before branching.

NCCL takes no CPU tensor ("No backend type associated with device type cpu"). Gloo behaves the
same for a group started as ``"cuda:gloo"`` (registered for CUDA tensors only), which a CPU
machine can create: under such a group, a package that ignores the group's registration issues a
CPU collective; one that reads it (``distributed.collective_device``) either finds the device the
backend takes (CUDA, on a GPU machine: ``benchmarks/gpu_check.sh`` runs that) or says why not
before any collective and before any state changes. Every collective torch.distributed receives
is checked by a wrapper against the group's registered device types.
"""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from microadam_dist import geometry_for
from microadam_dist.distributed import destroy_process_group, free_port
from microadam_dist.sharded import Segment, ShardedStepper

COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter_tensor",
    "broadcast",
    "reduce",
    "gather",
    "scatter",
    "all_to_all_single",
    "send",
    "recv",
    "isend",
    "irecv",
)
GEO = (64, 16, 0.05)  # block, bucket, density
GROUP = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, window_size=3, alpha=0.0)


def _accepted(group) -> list[str]:
    """The device types a group's backend is registered for, from torch's own record of it."""
    return [part.split(":")[0] for part in dist.get_backend_config(group).split(",")]


def _check_devices(calls: list) -> None:
    """Wrap torch.distributed's tensor collectives: each tensor must be on a device type its
    group's backend is registered for (what NCCL enforces). Records (name, device type)."""
    for name in COLLECTIVES:
        original = getattr(dist, name)

        def checked(*args, _original=original, _name=name, **kwargs):
            group = kwargs.get("group")
            tensors = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
            tensors += [t for a in args if isinstance(a, (list, tuple)) for t in a if isinstance(t, torch.Tensor)]
            accepted = _accepted(group)
            for t in tensors:
                calls.append((_name, t.device.type))
                assert t.device.type in accepted, (
                    f"{_name} on a {t.device.type} tensor, but the group's backend "
                    f"({dist.get_backend_config(group)}) takes only {accepted}"
                )
            return _original(*args, **kwargs)

        setattr(dist, name, checked)


def _spawn(fn, world: int, *args) -> None:
    mp.start_processes(_entry, args=(world, free_port(), fn, args), nprocs=world, join=True, start_method="spawn")


def _entry(rank, world, port, fn, args):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    # a short timeout: ranks that disagree about a collective fail in seconds instead of hanging
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=30))
    fn(rank, world, *args)
    destroy_process_group()


def _segments(rank: int, world: int, step: int) -> list[Segment]:
    """A 1-D parameter of 700 elements cut in equal pieces: the cuts fall inside blocks, so the
    step exchanges heads and tails."""
    gen = torch.Generator().manual_seed(step)
    full_param = torch.randn(700, generator=torch.Generator().manual_seed(99))
    full_grad = torch.randn(700, generator=gen)
    part = -(-700 // world)
    s, e = rank * part, min(700, (rank + 1) * part)
    return [
        Segment(
            key="p",
            geometry=geometry_for((700,), *GEO),
            start=s,
            param=full_param[s:e].clone(),
            grad=full_grad[s:e].clone(),
            group=dict(GROUP),
        )
    ]


# ---- 1. device contract -----------------------------------------------------------------------
def _fsdp_paths(rank, world, tmp):
    """FSDP2 steps (a 1-D parameter whose blocks straddle ranks), a non-finite gradient on one rank,
    the DCP probe, the 1-D state gather of get_state_dict, the full state dict, the job's mean."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from microadam_dist import MicroAdam
    from microadam_dist.train import mean_across_ranks

    calls = []
    _check_devices(calls)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 200), torch.nn.Linear(200, 3))
    mesh = init_device_mesh("cpu", (world,))
    fully_shard(model, mesh=mesh)
    opt = MicroAdam(model.parameters(), lr=1e-3, block_size=64, quant_bucket_size=16)
    get_state_dict(model, opt)  # the DCP probe on empty state
    for step in range(3):
        model(torch.randn(4, 16)).sum().backward()
        if step == 1 and rank == 1:
            model[0].bias.grad.to_local()[0] = float("nan")
        with pytest.warns(RuntimeWarning) if step == 1 else contextlib.nullcontext():
            opt.step()
        opt.zero_grad()
    assert opt.nonfinite_skips == 1
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=os.path.join(tmp, "ckpt"))
    get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
    assert mean_across_ranks(float(rank)) == (world - 1) / 2
    used = {name for name, _ in calls}
    assert {"all_reduce", "all_gather"} <= used, used  # the package's exchange and agreement ran


@pytest.mark.timeout(240)
def test_every_collective_is_on_a_device_its_group_takes(tmp_path):
    _spawn(_fsdp_paths, 2, str(tmp_path))


def _cuda_only_group(rank, world):
    """A group registered for CUDA tensors only (as NCCL is), CPU parameters, no CUDA device."""
    calls = []
    _check_devices(calls)
    group = dist.new_group(list(range(world)), backend="cuda:gloo")
    assert _accepted(group) == ["cuda"]
    stepper = ShardedStepper(group)
    segs = _segments(rank, world, 0)
    before = segs[0].param.clone()
    states = {}
    with pytest.raises(RuntimeError, match=r"takes no cpu tensors"):
        stepper.step(segs, states, chunk_elements=1 << 20)
    assert calls == []  # refused before any collective
    assert states == {} and torch.equal(segs[0].param, before)  # and before anything changed


@pytest.mark.timeout(120)
def test_a_group_without_a_cpu_backend_is_refused_before_any_collective():
    _spawn(_cuda_only_group, 2)


# ---- 2. ranks agree before they branch ----------------------------------------------------------
def _stale_plan_on_one_rank(rank, world):
    """Rank 0 alone drops its cached exchange plan (its local condition differs); every rank must
    still call the same collectives, and the step must equal that of a stepper that never lost it."""
    reference, stepper = ShardedStepper(), ShardedStepper()
    states_ref, states = {}, {}
    ref_param = param = None
    for step in range(4):
        if step == 2 and rank == 0:
            stepper._plan_key = None  # e.g. a rank that rebuilt its stepper
        ref_segs, segs = _segments(rank, world, step), _segments(rank, world, step)
        if step:  # carry the parameters on
            ref_segs[0].param.copy_(ref_param)
            segs[0].param.copy_(param)
        reference.step(ref_segs, states_ref, chunk_elements=1 << 20)
        stepper.step(segs, states, chunk_elements=1 << 20)
        ref_param, param = ref_segs[0].param, segs[0].param
        assert torch.equal(param, ref_param)
    for key in states_ref["p"]:
        assert torch.equal(torch.as_tensor(states["p"][key]), torch.as_tensor(states_ref["p"][key])), key


@pytest.mark.timeout(120)
def test_a_rank_whose_cached_plan_differs_takes_the_same_collectives():
    _spawn(_stale_plan_on_one_rank, 2)
