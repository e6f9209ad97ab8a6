"""The DeepSpeed ZeRO engine (``engine.Engine``): MicroAdam on ZeRO's flat fp32 partitions.

ZeRO hands the optimizer flat fp32 *partitions* (stage 1/2: one per parameter group, an equal
slice of the group's padded flat buffer; stage 3: one per sub group, the concatenation of every
parameter's own padded slice; the bf16 optimizer: like stage 1). MicroAdam's blocks are defined on
each original parameter's global element index, so each partition is mapped back through
DeepSpeed's own bookkeeping into *slices* (``zero_layout.ZeroSlice``): every original parameter
overlapping the partition becomes a ``sharded.Segment`` (a 1-D view into the partition and its
gradient at the parameter's global offset), stepped with the owner-of-block-start rule, bitwise
like one process (spec property P1).

A partition's state is packed (``state.packed_shapes``): its slices' owned blocks side by side. Its
state_dict adds the partition layout (``zero_layout.LAYOUT_KEY``), so a checkpoint can be mapped
back to parameters at any world size. Stage 0 (no partitioning wrapper) is ``engine.ParamsEngine``.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..engine import PARAMS, StepWork, install
from ..geometry import geometry_of
from ..hyperparams import check_same_geometry
from ..sharded import Segment
from ..state import StateLayout, packed_shapes, packed_views, packed_zeros
from ..zero_layout import LAYOUT_KEY, LAYOUT_VERSION, ZeroSlice, describe_partition, same_partition
from .wrappers import engine_on_stack, wrapper_kind, wrapper_on_stack

CONVERSION_TOOL = "microadam-ckpt reshard"


class MicroAdamCheckpointError(RuntimeError):
    """A MicroAdam ZeRO checkpoint cannot be loaded as it is (another world size or layout)."""


def reshard_hint(what: str) -> str:
    return (
        f"{what}. MicroAdam's ZeRO checkpoints hold each rank's partition of the optimizer state, "
        "which the ZeRO optimizer's own load_state_dict restores only at the data-parallel size and "
        "partitioning they were saved with; load it with engine.load_checkpoint(DIR) on an engine whose "
        "MicroAdam is attached (the JSON config or microadam_dist.deepspeed_zero.initialize/attach) or "
        "microadam_dist.deepspeed_zero.load_checkpoint(engine, DIR), which rebuild the world-size-free "
        f"state and cut it for this run (any world size, any ZeRO stage), or convert it with `{CONVERSION_TOOL}`"
    )


# ---- the layout of one partition -------------------------------------------------------------------
@dataclass
class Partition:
    flat: torch.Tensor  # the fp32 partition the optimizer sees
    process_group: Any
    slices: list[ZeroSlice]
    names: list[str | None]
    rank: int
    world: int

    def describe(self) -> dict:
        return describe_partition(self.rank, self.world, self.slices, self.names)

    def layouts(self, group: dict) -> list[StateLayout]:
        return [s.state_layout(group) for s in self.slices]

    def segments(self, group: dict) -> list[Segment]:
        flat, grad = self.flat, self.flat.grad
        return [
            Segment(
                key=s.key,
                geometry=geometry_of(s.shape, group),
                start=s.start,
                param=flat.data[s.offset : s.offset + s.numel],
                grad=None if grad is None else grad.view(-1)[s.offset : s.offset + s.numel],
                group=group,
            )
            for s in self.slices
        ]


def _round_robin_offsets(zero, i) -> list[int]:
    """Where each parameter of ZeRO-1/2 group ``i`` starts in the group's flat buffer."""
    offsets = getattr(zero, "round_robin_bit16_offsets", None)
    if offsets is not None:
        return list(offsets[i])
    params = zero.round_robin_bit16_groups[i]  # older DeepSpeed: padding list, or none at all
    paddings = getattr(zero, "round_robin_bit16_padding", None)
    paddings = paddings[i] if paddings is not None else [0] * len(params)
    out, pos = [], 0
    for p, pad in zip(params, paddings):
        out.append(pos)
        pos += p.numel() + pad
    return out


def _flat_slices(shapes, offsets, part_start, part_size, gi) -> list[ZeroSlice]:
    slices = []
    for j, (shape, off) in enumerate(zip(shapes, offsets)):
        n = math.prod(shape)
        lo, hi = max(off, part_start), min(off + n, part_start + part_size)
        if lo < hi:
            slices.append(ZeroSlice((gi, j), tuple(shape), lo - off, hi - lo, lo - part_start))
    return slices


def list_partitions(zero, kind: str, names: dict) -> list[Partition]:
    """Every fp32 partition of the ZeRO optimizer ``zero`` with the parameter slices it holds."""
    out = []
    if kind == "zero12":
        for i, flat in enumerate(zero.single_partition_of_fp32_groups):
            pg = zero.real_dp_process_group[i]
            rank, world = dist.get_rank(group=pg), dist.get_world_size(group=pg)
            params = zero.round_robin_bit16_groups[i]
            metas = getattr(zero, "round_robin_bit16_meta", None)
            shapes = [tuple(m.shape) for m in metas[i]] if metas is not None else [tuple(p.shape) for p in params]
            size = int(zero.partition_size[i])
            if flat.numel() != size:
                raise RuntimeError(f"ZeRO partition {i} has {flat.numel()} elements, its bookkeeping says {size}")
            slices = _flat_slices(shapes, _round_robin_offsets(zero, i), rank * size, size, i)
            out.append(Partition(flat, pg, slices, [names.get(id(params[s.key[1]])) for s in slices], rank, world))
    elif kind == "bf16":
        for i, flat in enumerate(zero.fp32_groups_flat_partition):
            pg = zero.real_dp_process_group[i]
            rank, world = dist.get_rank(group=pg), dist.get_world_size(group=pg)
            params = zero.bf16_groups[i]
            shapes = [tuple(p.shape) for p in params]
            offsets = [sum(math.prod(s) for s in shapes[:j]) for j in range(len(shapes))]
            size = flat.numel()
            slices = _flat_slices(shapes, offsets, rank * size, size, i)
            out.append(Partition(flat, pg, slices, [names.get(id(params[s.key[1]])) for s in slices], rank, world))
    elif kind == "zero3":
        for i, flat in enumerate(zero.fp32_partitioned_groups_flat):
            pg = zero._get_sub_group_process_group(i)
            rank, world = dist.get_rank(group=pg), dist.get_world_size(group=pg)
            slices, names_i, offset = [], [], 0
            for j, p in enumerate(zero.fp16_groups[i]):
                size = int(p.partition_numel())
                start = rank * size
                held = max(0, min(int(p.ds_numel) - start, size))
                if held:
                    slices.append(ZeroSlice((i, j), tuple(p.ds_shape), start, held, offset))
                    names_i.append(names.get(id(p)))
                offset += size
            if offset != flat.numel():
                raise RuntimeError(
                    f"ZeRO-3 sub group {i}: the fp32 partition has {flat.numel()} elements, "
                    f"its parameters' partitions {offset}"
                )
            out.append(Partition(flat, pg, slices, names_i, rank, world))
    return out


# ---- the engine --------------------------------------------------------------------------------------
class ZeroEngine:
    """MicroAdam's engine under DeepSpeed: steps and checkpoints ZeRO partitions.

    It finds the ZeRO optimizer lazily: from the DeepSpeed engine it was given (or that built the
    optimizer), else from the call stack (the ZeRO optimizer is the caller of ``step``/``state_dict``/
    ``load_state_dict``). Without a partitioning wrapper (stage 0) it is ``engine.ParamsEngine``.
    ``on_engine(ds_engine)`` runs once the DeepSpeed engine is known (it guards its checkpoint loads).
    """

    def __init__(self, ds_engine=None, zero=None, on_engine=None):
        self._ds_engine_ref = weakref.ref(ds_engine) if ds_engine is not None else None
        self.on_engine = on_engine
        self.zero = None
        self.kind = None
        self._plain = False
        self.partitions: dict[int, Partition] = {}  # id(fp32 partition) -> its layout
        if zero is not None:
            self.bind(zero)

    @property
    def ds_engine(self):
        return self._ds_engine_ref() if self._ds_engine_ref is not None else None

    def bind(self, zero) -> None:
        kind = wrapper_kind(zero)
        if kind is None:
            raise TypeError(f"{type(zero).__name__} is not a DeepSpeed ZeRO optimizer")
        if getattr(zero, "elastic_checkpoint", False):
            raise ValueError(
                'MicroAdam does not support "elastic_checkpoint": true (DeepSpeed would slice '
                "its state as if it were Adam's); set it to false"
            )
        if getattr(zero, "swap_optimizer", False):
            raise ValueError('MicroAdam does not support optimizer offload to NVMe; offload to "cpu" instead')
        ds_engine = self.ds_engine
        names = {}
        if ds_engine is not None and getattr(ds_engine, "param_names", None):
            names = {id(p): n for p, n in ds_engine.param_names.items()}
        self.zero, self.kind = zero, kind
        self.partitions = {id(part.flat): part for part in list_partitions(zero, kind, names)}

    def resolve(self, opt):
        """The ZeRO optimizer wrapping ``opt``, found on first use; None under stage 0."""
        if self.zero is not None or self._plain:
            return self.zero
        ds_engine = self.ds_engine
        candidate = getattr(ds_engine, "optimizer", None) if ds_engine is not None else None
        if candidate is not None and wrapper_kind(candidate) is None:
            self._plain = True  # stage 0: the engine's optimizer is MicroAdam itself or a bf16/fp16 wrapper
            return None
        if wrapper_kind(candidate) is None:
            candidate = wrapper_on_stack(opt)
        if candidate is not None and wrapper_kind(candidate) is not None:
            if getattr(candidate, "optimizer", None) is not opt:
                raise RuntimeError("the engine's ZeRO optimizer does not wrap this MicroAdam")
            if ds_engine is None:  # built by hand: the engine driving this call, for names and the guard
                ds_engine = engine_on_stack()
                if ds_engine is not None and getattr(ds_engine, "optimizer", None) is candidate:
                    self._ds_engine_ref = weakref.ref(ds_engine)
                    if self.on_engine is not None:
                        self.on_engine(ds_engine)
            self.bind(candidate)
        return self.zero

    def _partition(self, p) -> Partition:
        part = self.partitions.get(id(p))
        if part is None:
            raise RuntimeError(
                "MicroAdam was handed a tensor that is none of DeepSpeed's ZeRO partitions; "
                "was the ZeRO optimizer rebuilt after attach()?"
            )
        return part

    # -- the Engine protocol -----------------------------------------------------------------------
    def segments(self, optimizer, group_index: int, group: dict) -> list[StepWork]:
        if self.resolve(optimizer) is None:
            return PARAMS.segments(optimizer, group_index, group)
        works = []
        for p in group["params"]:  # ZeRO-3 shows inactive groups with no params: nothing to do
            part = self._partition(p)
            if part.flat.grad is None:  # every rank alike: DeepSpeed sets all partitions' grads together
                continue
            segs = part.segments(group)
            packed = optimizer.state.get(part.flat)
            # Before the first step each segment's state is created by the stepper (so an lr-0,
            # zero-gradient first step only creates state, as for unsharded parameters), then packed.
            views = dict(zip((s.key for s in segs), packed_views(part.layouts(group), packed))) if packed else {}
            finish = None if packed else self._packer(optimizer, part, group, views)
            works.append(
                StepWork(
                    key=id(part.flat),
                    process_group=part.process_group,
                    local=False,
                    segments=segs,
                    states=views,
                    finish=finish,
                    describe=lambda key: f"parameter {key[1]} of DeepSpeed group {key[0]}",
                )
            )
        return works

    @staticmethod
    def _packer(optimizer, part: Partition, group: dict, fresh: dict):
        def pack():
            """Store the state the stepper created (first step) as the partition's packed tensors."""
            layouts = part.layouts(group)
            packed = optimizer.state[part.flat] = packed_zeros(layouts, part.flat.device)
            for s, view in zip(part.slices, packed_views(layouts, packed)):
                for name, value in fresh.get(s.key, {}).items():  # none for a parameter skipped (non-finite)
                    view[name].copy_(value)

        return pack

    def _indexed(self, opt):
        """(state_dict index, partition or None, group) for every parameter the optimizer holds."""
        index = 0
        for group in opt.param_groups:
            for p in group["params"]:
                yield index, self.partitions.get(id(p)), group
                index += 1

    def state_dict(self, optimizer) -> dict:
        if self.resolve(optimizer) is None:
            return PARAMS.state_dict(optimizer)
        sd = torch.optim.Optimizer.state_dict(optimizer)
        layout = {"version": LAYOUT_VERSION, "kind": self.kind, "partitions": {}}
        for index, part, _ in self._indexed(optimizer):
            if part is None:
                raise RuntimeError("a parameter of this MicroAdam is not a ZeRO partition")
            layout["partitions"][index] = part.describe()
        sd[LAYOUT_KEY] = layout
        return sd

    def load_state_dict(self, optimizer, sd: dict) -> None:
        saved_layout = sd.get(LAYOUT_KEY)
        if self.resolve(optimizer) is None:
            if saved_layout is not None:
                raise MicroAdamCheckpointError(
                    reshard_hint(
                        "this optimizer state was saved by MicroAdam under DeepSpeed ZeRO and is being loaded "
                        "without ZeRO partitions"
                    )
                )
            return PARAMS.load_state_dict(optimizer, sd)
        if saved_layout is None:
            raise MicroAdamCheckpointError(
                reshard_hint(
                    "this optimizer state has no ZeRO layout: it was not saved by MicroAdam under DeepSpeed ZeRO "
                    "(a canonical, unsharded state_dict?)"
                )
            )
        groups = sd.get("param_groups", [])
        if len(groups) != len(optimizer.param_groups):
            raise MicroAdamCheckpointError(
                reshard_hint(
                    f"the checkpoint has {len(groups)} parameter groups, this optimizer {len(optimizer.param_groups)}"
                )
            )
        check_same_geometry(groups, optimizer.param_groups)
        for i, (saved, group) in enumerate(zip(groups, optimizer.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise MicroAdamCheckpointError(
                    reshard_hint(
                        f"parameter group {i}: the checkpoint has {len(saved['params'])} partitions, this "
                        f"optimizer {len(group['params'])}"
                    )
                )
        saved_parts = saved_layout["partitions"]
        loaded = {}
        for index, part, group in self._indexed(optimizer):
            info = saved_parts.get(index)
            if info is None or info["world_size"] != part.world or info["rank"] != part.rank:
                got = "none" if info is None else f"rank {info['rank']} of {info['world_size']}"
                raise MicroAdamCheckpointError(
                    reshard_hint(
                        f"partition {index}: the checkpoint was saved by {got}, "
                        f"this is rank {part.rank} of {part.world}"
                    )
                )
            if not same_partition(info, part.rank, part.world, part.slices):
                raise MicroAdamCheckpointError(
                    reshard_hint(
                        f"partition {index}: the checkpoint's parameter slices differ from this run's (another "
                        "model, parameter grouping or ZeRO configuration)"
                    )
                )
            st = sd["state"].get(index)
            if st is None:
                continue
            shapes = packed_shapes(part.layouts(group))
            StateLayout.check_shapes(
                st,
                shapes,
                f"partition {index}",
                error=MicroAdamCheckpointError,
                hint=reshard_hint("saved at another world size or layout"),
            )
            loaded[part.flat] = {k: st[k].to("cpu" if k == "step" else part.flat.device, copy=True) for k in shapes}
        install(optimizer, {k: v for k, v in sd.items() if k != LAYOUT_KEY}, loaded)


def groups_of(optimizer, engine: ZeroEngine):
    """(param group, [partitions]) in DeepSpeed's order, the same on every rank.

    Stage 1/2 and the bf16 optimizer show every partition in ``param_groups``; ZeRO-3 shows them
    only during its step, so its sub groups are listed from the ZeRO optimizer.
    """
    zero = engine.zero
    if engine.kind == "zero3":
        for sub, flat in enumerate(zero.fp32_partitioned_groups_flat):
            yield optimizer.param_groups[zero.sub_group_to_group_id[sub]], [engine.partitions[id(flat)]]
    else:
        for group in optimizer.param_groups:
            yield group, [engine.partitions[id(p)] for p in group["params"]]


def zero_engine_of(optimizer) -> ZeroEngine:
    """The ZeroEngine of a MicroAdam stepping ZeRO partitions; ValueError otherwise."""
    engine = getattr(optimizer, "engine", None)
    if not isinstance(engine, ZeroEngine) or engine.resolve(optimizer) is None:
        raise ValueError(
            "this needs a MicroAdam stepping DeepSpeed ZeRO partitions (the JSON config, or "
            "microadam_dist.deepspeed_zero.initialize/attach)"
        )
    return engine


def gather_canonical_state(optimizer, by_name: bool = False) -> dict[Any, dict[str, torch.Tensor]]:
    """Every parameter's state in row form (``state.StateLayout.row_shapes``), on every rank.

    Keys are ``(DeepSpeed group index, index in that group)``: the order of the ``param_shapes`` that
    DeepSpeed writes into its model-states file, so names follow from it; with ``by_name`` they are the
    parameters' names (known when the engine is known). A collective: every rank of the data-parallel
    group must call it. This is the conversion tool's input; the tests compare it with one process.
    """
    engine = zero_engine_of(optimizer)
    parts: dict[tuple, list] = {}
    meta: dict[tuple, tuple] = {}
    names: dict[tuple, str | None] = {}
    for group, partitions in groups_of(optimizer, engine):
        for part in partitions:
            packed = optimizer.state.get(part.flat)
            mine = []
            if packed:
                layouts = part.layouts(group)
                for s, layout, view, name in zip(part.slices, layouts, packed_views(layouts, packed), part.names):
                    mine.append(
                        (s.key, name, s.shape, layout.b0, layout.b1, {k: v.cpu().clone() for k, v in view.items()})
                    )
            everyone = [None] * part.world
            if part.world > 1:
                dist.all_gather_object(everyone, mine, group=part.process_group)
            else:
                everyone = [mine]
            for rank_parts in everyone:
                for key, name, shape, b0, b1, st in rank_parts:
                    parts.setdefault(key, []).append((b0, b1, st))
                    meta[key] = (shape, group)
                    names[key] = name
    out = {}
    for key, items in sorted(parts.items()):
        shape, group = meta[key]
        if by_name and names[key] is None:
            raise ValueError("parameter names are unknown: use attach(engine) or the JSON config path")
        try:
            out[names[key] if by_name else key] = StateLayout.join(
                geometry_of(shape, group), group["window_size"], items
            )
        except ValueError as e:
            raise RuntimeError(f"parameter {key}: {e}") from e
    return out
