"""Resuming a DeepSpeed engine from any MicroAdam checkpoint, at any world size or ZeRO stage.

``engine.load_checkpoint`` (what the HF Trainer's ``resume_from_checkpoint`` and Accelerate call)
is guarded (:func:`guard_checkpoint_loads`): DeepSpeed's own load, bitwise, when every rank's saved
partition layout is its own; else the checkpoint is read parameter by parameter and cut for this
run (:func:`load_canonical`), with DeepSpeed's LR scheduler, step counters and client state.
:func:`load_checkpoint` also takes canonical and FSDP2 DCP checkpoints. Universal checkpoints,
whose tools know only Adam's state, are refused.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

from ..checkpoint import (
    CheckpointError,
    DeepSpeedCheckpoint,
    apply_saved_hyperparameters,
    canonical_parameter,
    check_compatible,
    load_scheduler,
    open_checkpoint,
)
from ..optimizer import MicroAdam
from ..state import packed_views, packed_zeros
from ..zero_layout import RANK_FILE, same_partition
from .partitions import MicroAdamCheckpointError, ZeroEngine, groups_of, reshard_hint
from .wrappers import wrapper_kind


def attach(engine) -> ZeroEngine:
    """Teach the engine's MicroAdam DeepSpeed's partition layout (after ``deepspeed.initialize``)
    and guard the engine's checkpoint loads."""
    zero = engine.optimizer
    opt = engine.basic_optimizer if getattr(engine, "basic_optimizer", None) is not None else zero
    if not isinstance(opt, MicroAdam):
        raise TypeError(f"the engine's optimizer is {type(opt).__name__}, not MicroAdam")
    zero_engine = ZeroEngine(ds_engine=engine, on_engine=guard_checkpoint_loads)
    if wrapper_kind(zero) is not None:
        zero_engine.bind(zero)
    opt.engine = zero_engine
    guard_checkpoint_loads(engine)
    return zero_engine


# ---- engine.load_checkpoint at any world size ------------------------------------------------------
#: what DeepSpeed's _load_checkpoint keeps out of the client state it returns
_DEEPSPEED_STATES = (
    "module",
    "skipped_steps",
    "global_steps",
    "dp_world_size",
    "mp_world_size",
    "data_sampler",
    "random_ltd",
)


def guard_checkpoint_loads(engine) -> None:
    """Let ``engine.load_checkpoint`` (what the HF Trainer and Accelerate call) resume any MicroAdam
    ZeRO checkpoint, saved at any data-parallel size or ZeRO stage.

    Wraps the engine's ``load_checkpoint`` (instance attribute). Each rank checks that the checkpoint
    was saved at this size with its own partition layout; one collective makes every rank take the
    same branch: DeepSpeed's own load (bitwise) when all match, else :func:`_load_resharded` (the
    state read parameter by parameter and cut for this run, DeepSpeed's extras from its model-states
    file). Universal checkpoints, whose tools know only Adam's state, are refused.
    """
    original = getattr(engine, "load_checkpoint", None)
    if original is None or getattr(original, "_microadam_guard", False):
        return

    def load_checkpoint(
        load_dir,
        tag=None,
        load_module_strict=True,
        load_optimizer_states=True,
        load_lr_scheduler_states=True,
        load_module_only=False,
        custom_load_fn=None,
    ):
        args = dict(
            load_module_strict=load_module_strict,
            load_optimizer_states=load_optimizer_states,
            load_lr_scheduler_states=load_lr_scheduler_states,
            load_module_only=load_module_only,
            custom_load_fn=custom_load_fn,
        )
        if getattr(engine, "load_universal_checkpoint", lambda: False)():
            raise MicroAdamCheckpointError(
                reshard_hint(
                    "DeepSpeed universal checkpoints know only Adam's state (exp_avg, exp_avg_sq), not MicroAdam's"
                )
            )
        if tag is None and os.path.isfile(os.path.join(load_dir, "latest")):
            with open(os.path.join(load_dir, "latest")) as f:
                tag = f.read().strip()
        native = (
            tag is None or custom_load_fn is not None or _native_load_fits(engine, os.path.join(load_dir, str(tag)))
        )
        engine.microadam_last_load = "native" if all(_everyone(native)) else "resharded"  # for logs and tests
        if engine.microadam_last_load == "native":
            return original(load_dir, tag, **args)
        return _load_resharded(engine, os.path.join(load_dir, str(tag)), **args)

    load_checkpoint._microadam_guard = True
    engine.load_checkpoint = load_checkpoint


def _everyone(value) -> list:
    """Every rank's ``value`` (one collective), so that all ranks take the same branch."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)  # picks the device the default group's backend needs
    return out


def _native_load_fits(engine, tag_dir) -> bool:
    """Whether DeepSpeed's own load fits this rank: the checkpoint holds MicroAdam partitions saved
    at this data-parallel size with exactly this rank's layout (or is nothing this module knows,
    which DeepSpeed and the adapter's own check then handle)."""
    opt = engine.basic_optimizer
    adapter = getattr(opt, "engine", None)
    if not isinstance(adapter, ZeroEngine) or adapter.resolve(opt) is None or not os.path.isdir(tag_dir):
        return True  # stage 0 (world-size-free state) or not a checkpoint: DeepSpeed's own path
    files = {int(m.group(1)): f for f in os.listdir(tag_dir) if (m := RANK_FILE.match(f))}
    if not files:
        return True
    if adapter.kind == "zero3":  # its param_groups hold the partitions only while it saves: list them as then
        zero = adapter.zero
        subs = sorted(range(len(zero.fp32_partitioned_groups_flat)), key=lambda i: zero.sub_group_to_group_id[i])
        parts = [adapter.partitions[id(zero.fp32_partitioned_groups_flat[i])] for i in subs]
    else:
        parts = [part for _, part, _ in adapter._indexed(opt)]
    if not parts or None in parts:
        return True
    mine = dict(enumerate(parts))
    rank = parts[0].rank
    if len(files) != parts[0].world or rank not in files:
        return False
    try:
        _, layout, _ = DeepSpeedCheckpoint.load_rank_file(os.path.join(tag_dir, files[rank]))
    except CheckpointError:
        return True  # another optimizer's file: the adapter refuses it with its own message
    saved = layout["partitions"]
    return set(mine) == {int(i) for i in saved} and all(
        same_partition(info, mine[int(i)].rank, mine[int(i)].world, mine[int(i)].slices) for i, info in saved.items()
    )


def _load_resharded(
    engine,
    tag_dir,
    *,
    load_module_strict=True,
    load_optimizer_states=True,
    load_lr_scheduler_states=True,
    load_module_only=False,
    custom_load_fn=None,
):
    """``engine.load_checkpoint`` for a MicroAdam ZeRO checkpoint of another size or layout: weights,
    fp32 masters and MicroAdam state through :func:`load_canonical`, then what DeepSpeed's own load
    restores from the model-states file (LR scheduler, step counters) and its client state."""
    ckpt = DeepSpeedCheckpoint(Path(tag_dir))
    models = sorted(Path(tag_dir).glob("*model_states.pt"))  # ZeRO-3 writes one per rank: rank 0's is read
    if not models:
        raise CheckpointError(f"{tag_dir} has no *model_states.pt: the DeepSpeed checkpoint is incomplete")
    saved = torch.load(models[0], map_location="cpu", weights_only=False)
    states = load_optimizer_states and not load_module_only
    load_canonical(engine, ckpt, load_state=states)
    deepspeed_states = ["module"]
    if not load_module_only:
        if load_lr_scheduler_states and engine.lr_scheduler is not None and saved.get("lr_scheduler") is not None:
            engine.lr_scheduler.load_state_dict(saved["lr_scheduler"])
        engine.global_steps = saved["global_steps"]
        engine.global_samples = saved.get("global_samples", engine.global_steps * engine.train_batch_size())
        engine.skipped_steps = saved["skipped_steps"]
        deepspeed_states = list(_DEEPSPEED_STATES)
    if load_lr_scheduler_states:
        deepspeed_states.append("lr_scheduler")
    if load_optimizer_states:
        deepspeed_states.append("optimizer")
    return str(models[0]), {k: v for k, v in saved.items() if k not in deepspeed_states}


def load_checkpoint(engine, path, *, progress: bool = False):
    """Resume ``engine`` from any MicroAdam checkpoint: DeepSpeed's own at any world size or stage,
    a canonical directory (``microadam-ckpt convert``) or an FSDP2 DCP checkpoint.

    A DeepSpeed checkpoint goes through ``engine.load_checkpoint`` (DeepSpeed's own load when every
    rank's layout matches, else resharded; with the LR scheduler and step counters either way).
    Anything else is read parameter by parameter (``checkpoint.open_checkpoint``) and cut for this
    run: the module's weights, DeepSpeed's fp32 master partitions and MicroAdam's state, then
    ``engine.global_steps`` from the checkpoint's step. Returns the opened checkpoint (None for a
    DeepSpeed one). Every rank must call it; all take the same branch.
    """
    try:
        ckpt, local = open_checkpoint(path), None
    except CheckpointError as e:
        ckpt, local = None, str(e)
    everyone = _everyone((local, isinstance(ckpt, DeepSpeedCheckpoint)))
    failed = [(rank, error) for rank, (error, _) in enumerate(everyone) if error is not None]
    if failed:  # on every rank, so none is left waiting in a collective
        raise CheckpointError("; ".join(f"rank {rank}: {error}" for rank, error in failed))
    if all(is_ds for _, is_ds in everyone):
        guard_checkpoint_loads(engine)
        path = os.fspath(path)
        if os.path.isfile(os.path.join(path, "latest")):
            engine.load_checkpoint(path)
        else:  # the tag directory itself
            engine.load_checkpoint(os.path.dirname(os.path.abspath(path)), tag=os.path.basename(os.path.abspath(path)))
        return None
    load_canonical(engine, ckpt, progress=progress)
    load_scheduler(ckpt, engine.lr_scheduler)  # the schedule continues (None: the engine has none)
    return ckpt


def load_canonical(engine, ckpt, *, progress: bool = False, load_state: bool = True) -> None:
    """Load an opened checkpoint (``checkpoint.Checkpoint``) into a ZeRO-1/2/3 engine at any world size.

    Every rank reads the parameters its partitions hold (one at a time) and refuses another
    model or MicroAdam geometry before changing anything. ``load_state=False``: the weights only
    (MicroAdam starts afresh).
    """
    opt = engine.basic_optimizer
    if not isinstance(opt, MicroAdam):
        raise TypeError(f"the engine's optimizer is {type(opt).__name__}, not MicroAdam")
    adapter = opt.engine
    if not isinstance(adapter, ZeroEngine):
        adapter = attach(engine)
    if adapter.resolve(opt) is None:
        raise CheckpointError(
            "load_canonical needs a ZeRO-1/2/3 engine; with stage 0 use "
            "microadam_dist.checkpoint.load(engine.module, optimizer, path)"
        )
    module_params = dict(engine.module.named_parameters())
    shapes = {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in module_params.items() if p.requires_grad}
    groups = {}
    for group, parts in groups_of(opt, adapter):
        for part in parts:
            for name in part.names:
                if name is None:
                    raise CheckpointError("parameter names are unknown: use attach(engine) or the JSON config path")
                groups[name] = group
    check_compatible(ckpt, shapes, {n: g for n, g in groups.items()})
    # read and check everything this rank needs first, so a bad file changes nothing; keep only
    # what the partitions hold (stage 1/2 module weights are read again below, one at a time)
    values = {}
    for name in shapes if adapter.kind != "zero3" else sorted(set(groups)):
        weight, st = canonical_parameter(ckpt, name)
        if name in groups:
            values[name] = (weight, st if load_state else None)
    zero = adapter.zero
    with torch.no_grad():
        for group, parts in groups_of(opt, adapter):
            for part in parts:
                layouts = part.layouts(group)
                fresh = {}
                for s, layout, name in zip(part.slices, layouts, part.names):
                    weight, st = values[name]
                    if weight is not None:
                        flat_weight = weight.reshape(-1)[s.start : s.start + s.numel]
                        part.flat.data[s.offset : s.offset + s.numel].copy_(flat_weight)
                        if adapter.kind == "zero3":  # the module's bit16 partition of this parameter
                            lp = zero.fp16_groups[s.key[0]][s.key[1]]
                            lp.ds_tensor.data[: s.numel].copy_(flat_weight.to(lp.ds_tensor.dtype))
                    if st is not None:
                        fresh[s.key] = layout.from_rows(st)
                if fresh:  # a slice without state (saved before its first step) keeps zeros
                    packed = opt.state[part.flat] = packed_zeros(layouts, part.flat.device)
                    for s, view in zip(part.slices, packed_views(layouts, packed)):
                        for field, value in fresh.get(s.key, {}).items():
                            view[field].copy_(value)
                else:
                    opt.state.pop(part.flat, None)
        if adapter.kind != "zero3":  # stage 1/2: every rank holds the whole module in bit16
            for name in shapes:
                weight = values[name][0] if name in values else ckpt.weight(name)
                if weight is not None:
                    module_params[name].data.copy_(weight.reshape(module_params[name].shape))
    if load_state:
        apply_saved_hyperparameters(opt.param_groups, ckpt.groups)
    if ckpt.step is not None:
        engine.global_steps = int(ckpt.step)
    dist.barrier()
