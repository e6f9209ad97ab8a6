"""Worker bodies for tests/test_resharding.py (spec property P2): train 5 steps at N ranks of one
engine, save, load at M ranks of another (or one process), train 5 more steps, keep everything.

The model and gradients are the DeepSpeed P1 ones (tests/ds_workers.py): injected gradients that
every engine reduces exactly, so each run must equal one process bitwise, before and after the move.
"""

from __future__ import annotations

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import ds_workers as W
import torch
import torch.distributed as dist

SAVE_AT = 5
TOTAL = 10


def reference(steps: int):
    """One process, plain MicroAdam: fp32 params (by name) and canonical state (by name)."""
    from microadam_dist import MicroAdam
    from microadam_dist.checkpoint.local import _LiveCheckpoint

    model = W.Injected()
    opt = MicroAdam(model.parameters(), **W.P1_HYPER)
    train_single(model, opt, 0, steps)
    return model, opt, _LiveCheckpoint(model, opt)


def train_single(model, opt, start: int, stop: int) -> None:
    for t in range(start, stop):
        for p, g in zip(model.parameters(), W.p1_grads(t)):
            p.grad = g.clone()
        opt.step()


# ---- DeepSpeed ---------------------------------------------------------------------------------------
#: a warm-up still under way at SAVE_AT, so a resume that loses the schedule takes other steps
WARMUP = {"warmup_min_lr": 0.0, "warmup_max_lr": W.P1_HYPER["lr"], "warmup_num_steps": 8, "warmup_type": "linear"}


def _ds_engine(stage: int, scheduler: bool = False):
    torch.set_num_threads(1)
    cfg = W.ds_config(stage, torch.float32, optimizer={"type": "MicroAdam", "params": dict(W.P1_HYPER)})
    if scheduler:
        cfg["scheduler"] = {"type": "WarmupLR", "params": dict(WARMUP)}
    return W._engine(W.Injected(), cfg, "json")


def _ds_train(engine, start: int, stop: int) -> None:
    for t in range(start, stop):
        loss = engine([g.clone() for g in W.p1_grads(t)])
        engine.backward(loss)
        engine.step()


def _ds_result(engine) -> dict:
    from microadam_dist.deepspeed_zero import gather_canonical_state

    names = [n for n, _ in engine.module.named_parameters()]
    return {
        "params": dict(zip(names, W.full_fp32_params(engine))),
        "state": gather_canonical_state(engine.basic_optimizer, by_name=True),
    }


def ds_source(rank, world, stage, out):
    engine = _ds_engine(stage)
    _ds_train(engine, 0, SAVE_AT)
    engine.save_checkpoint(out)


def _ds_train_lrs(engine, start: int, stop: int) -> list[float]:
    """Train, returning the learning rate each step ran with."""
    lrs = []
    for t in range(start, stop):
        lrs.append(engine.basic_optimizer.param_groups[0]["lr"])
        _ds_train(engine, t, t + 1)
    return lrs


def ds_scheduled_source(rank, world, stage, out_dir):
    """With DeepSpeed's WarmupLR: SAVE_AT steps, save, then on to TOTAL (the uninterrupted run)."""
    engine = _ds_engine(stage, scheduler=True)
    _ds_train(engine, 0, SAVE_AT)
    engine.save_checkpoint(f"{out_dir}/ds")
    scheduler = engine.lr_scheduler.state_dict()
    lrs = _ds_train_lrs(engine, SAVE_AT, TOTAL)
    final = _ds_result(engine)
    if rank == 0:
        torch.save({"scheduler": scheduler, "lrs": lrs, "final": final}, f"{out_dir}/straight.pt")


def ds_scheduled_target(rank, world, stage, src, out):
    """Resume with deepspeed_zero.load_checkpoint from a converted checkpoint; the rest of the run."""
    from microadam_dist.deepspeed_zero import load_checkpoint

    engine = _ds_engine(stage, scheduler=True)
    load_checkpoint(engine, src)
    scheduler = engine.lr_scheduler.state_dict()
    lrs = _ds_train_lrs(engine, SAVE_AT, TOTAL)
    final = _ds_result(engine)
    if rank == 0:
        torch.save({"scheduler": scheduler, "lrs": lrs, "final": final}, out)


def ds_target(rank, world, stage, src, out):
    """Resume from ``src`` (any format) with deepspeed_zero.load_checkpoint, then 5 more steps."""
    from microadam_dist.deepspeed_zero import load_checkpoint

    engine = _ds_engine(stage)
    load_checkpoint(engine, src)
    loaded = _ds_result(engine)
    # the module's own (bit16 side) weights too: what the next forward uses
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), enabled=stage == 3):
        module = {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}
    loaded_module = {"params": module, "state": loaded["state"]}
    assert engine.global_steps == SAVE_AT
    _ds_train(engine, SAVE_AT, TOTAL)
    final = _ds_result(engine)
    if rank == 0:
        torch.save({"loaded": loaded, "module": loaded_module, "final": final}, out)


# ---- FSDP2 ---------------------------------------------------------------------------------------
def _fsdp_model(world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from microadam_dist import MicroAdam

    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (world,))
    model = W.Injected()
    fully_shard(model, mesh=mesh)
    return model, MicroAdam(model.parameters(), **W.P1_HYPER), mesh


def _fsdp_train(model, opt, mesh, start, stop):
    from torch.distributed.tensor import distribute_tensor

    for t in range(start, stop):
        for p, g in zip(model.parameters(), W.p1_grads(t)):
            p.grad = distribute_tensor(g, mesh, p.placements)
        opt.step()


def fsdp_source(rank, world, out):
    from microadam_dist.train import save_checkpoint

    model, opt, mesh = _fsdp_model(world)
    _fsdp_train(model, opt, mesh, 0, SAVE_AT)
    from pathlib import Path

    save_checkpoint(Path(out), model, opt, {"step": SAVE_AT, "losses": [], "history": []})


def fsdp_target(rank, world, src, out):
    """Resume from a DCP checkpoint (as the main job does), 5 more steps, save DCP again."""
    from pathlib import Path

    from microadam_dist.train import load_checkpoint, save_checkpoint

    model, opt, mesh = _fsdp_model(world)
    meta = load_checkpoint(Path(src), model, opt)
    assert meta["step"] == SAVE_AT
    _fsdp_train(model, opt, mesh, SAVE_AT, TOTAL)
    save_checkpoint(Path(out), model, opt, {"step": TOTAL, "losses": [], "history": []})
    dist.barrier()


# ---- non-finite gradients under DeepSpeed ----------------------------------------------------------------
NAN_STEP, NAN_PARAM = 2, 0


def grads_with_nan(t: int) -> list[torch.Tensor]:
    grads = W.p1_grads(t)
    if t == NAN_STEP:
        grads[NAN_PARAM][3, 7] = float("nan")  # reaches every rank's copy after the reduction
    return grads


def ds_nonfinite(rank, world, stage, out):
    import warnings

    engine = _ds_engine(stage)
    for t in range(SAVE_AT):
        loss = engine([g.clone() for g in grads_with_nan(t)])
        engine.backward(loss)
        with warnings.catch_warnings(record=True):
            engine.step()
    result = _ds_result(engine)
    result["skips"] = engine.basic_optimizer.nonfinite_skips
    result["deepspeed_skipped_steps"] = engine.skipped_steps
    if rank == 0:
        torch.save(result, out)


def reference_without_the_nan_step():
    """One process, MicroAdam over every gradient but the NaN step's (what DeepSpeed's own overflow
    check leaves: it drops the whole step before the optimizer sees it)."""
    from microadam_dist import MicroAdam
    from microadam_dist.checkpoint.local import _LiveCheckpoint

    model = W.Injected()
    opt = MicroAdam(model.parameters(), **W.P1_HYPER)
    for t in range(SAVE_AT):
        if t == NAN_STEP:
            continue
        for p, g in zip(model.parameters(), grads_with_nan(t)):
            p.grad = g.clone()
        opt.step()
    return _LiveCheckpoint(model, opt)
