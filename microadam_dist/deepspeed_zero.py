"""DeepSpeed ZeRO stages 0-3 with MicroAdam (docs/design.md, section "DeepSpeed ZeRO").

ZeRO hands the optimizer flat fp32 *partitions* (stage 1/2: one per parameter group, an equal
slice of the group's padded flat buffer; stage 3: one per sub group, the concatenation of every
parameter's own padded slice). MicroAdam's blocks are defined on each original parameter's global
element index, so each partition is mapped back through DeepSpeed's own bookkeeping: every
original parameter overlapping the partition becomes a ``sharded.Segment`` (a 1-D view into the
partition and its gradient at the parameter's global offset) and ``sharded.ShardedStepper`` steps
them with the owner-of-block-start scheme, bitwise like one process (spec property P1).

Two ways in:

* the JSON config: ``"optimizer": {"type": "MicroAdam", "params": {...}}`` with
  ``"zero_allow_untested_optimizer": true``, once ``register_with_torch_optim()`` has run (importing
  ``microadam_dist`` does it). DeepSpeed resolves the name with ``getattr(torch.optim, "MicroAdam")``,
  which is :class:`DeepSpeedMicroAdam`: built inside ``DeepSpeedEngine._configure_basic_optimizer``,
  it remembers that engine and reads ``engine.optimizer`` (the ZeRO optimizer) at its first step,
  checkpoint save or checkpoint load;
* :func:`initialize` (builds the optimizer from keyword arguments) or :func:`attach` (after a
  ``deepspeed.initialize`` that was given a MicroAdam built by hand).

Stage 0 (no ZeRO: replicated parameters, plain or bf16-master optimizer wrappers) needs nothing:
MicroAdam steps the whole parameters, and its checkpoints are the canonical row form.

Checkpoints: ``engine.save_checkpoint`` / ``engine.load_checkpoint`` at the same world size resume
bitwise (each rank saves its partition's state with a description of its layout, checked on
load). At another data-parallel size, layout or ZeRO stage, ``engine.load_checkpoint`` (what the
HF Trainer's ``resume_from_checkpoint`` calls) reads the checkpoint parameter by parameter and cuts
it for this run, with DeepSpeed's LR scheduler, step counters and client state; universal
checkpoints stop with :class:`MicroAdamCheckpointError`. :func:`load_checkpoint` also loads FSDP2
DCP and canonical checkpoints into any layout.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .functional import STATE_DTYPES, join_owned_blocks
from .geometry import geometry_for, same_geometry_setting
from .optimizer import GEOMETRY_KEYS, MicroAdam
from .sharded import Segment, ShardedStepper

CONVERSION_TOOL = "microadam-ckpt reshard"
#: the key of the layout description added to the optimizer state_dict of a ZeRO partition
LAYOUT_KEY = "microadam_zero_layout"
LAYOUT_VERSION = 1


class MicroAdamCheckpointError(RuntimeError):
    """A MicroAdam ZeRO checkpoint cannot be loaded as it is (another world size or layout)."""


def _reshard_hint(what: str) -> str:
    return (f"{what}. MicroAdam's ZeRO checkpoints hold each rank's partition of the optimizer state, "
            "which the ZeRO optimizer's own load_state_dict restores only at the data-parallel size and "
            "partitioning they were saved with; load it with engine.load_checkpoint(DIR) on an engine whose "
            "MicroAdam is attached (the JSON config or microadam_dist.deepspeed_zero.initialize/attach) or "
            "microadam_dist.deepspeed_zero.load_checkpoint(engine, DIR), which rebuild the world-size-free "
            f"state and cut it for this run (any world size, any ZeRO stage), or convert it with `{CONVERSION_TOOL}`")


# ---- which DeepSpeed optimizer wraps ours ---------------------------------------------------------
def _wrapper_kind(obj) -> str | None:
    """'zero12', 'zero3', 'bf16' for the ZeRO-style partitioning wrappers, else None."""
    if "deepspeed" not in sys.modules:
        return None
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if isinstance(obj, DeepSpeedZeroOptimizer_Stage3):
        return "zero3"
    if isinstance(obj, DeepSpeedZeroOptimizer):
        return "zero12"
    if isinstance(obj, BF16_Optimizer):
        return "bf16"
    return None


def _engine_on_stack():
    """The DeepSpeedEngine whose method is running further up the call stack, if any."""
    if "deepspeed" not in sys.modules:
        return None
    from deepspeed.runtime.engine import DeepSpeedEngine

    frame = sys._getframe(1)
    while frame is not None:
        obj = frame.f_locals.get("self")
        if isinstance(obj, DeepSpeedEngine):
            return obj
        frame = frame.f_back
    return None


def _wrapper_on_stack(opt):
    """The ZeRO optimizer that is calling into ``opt`` (a frame whose ``self.optimizer is opt``)."""
    frame = sys._getframe(1)
    while frame is not None:
        obj = frame.f_locals.get("self")
        if obj is not None and obj is not opt and getattr(obj, "optimizer", None) is opt \
                and _wrapper_kind(obj) is not None:
            return obj
        frame = frame.f_back
    return None


# ---- the layout of one partition -------------------------------------------------------------------
@dataclass(frozen=True)
class _Piece:
    """Elements [start, start + numel) of parameter ``key`` sit at ``offset`` in the partition."""

    key: tuple[int, int]  # (DeepSpeed group index, index in that group), the same on every rank
    shape: tuple[int, ...]
    start: int
    numel: int
    offset: int


@dataclass
class _Partition:
    flat: torch.Tensor  # the fp32 partition the optimizer sees
    process_group: Any
    pieces: list[_Piece]
    names: list[str | None]
    rank: int
    world: int

    def __post_init__(self):
        self.stepper = ShardedStepper(self.process_group)

    def describe(self) -> list[tuple]:
        return [(p.key, p.shape, p.start, p.numel, p.offset) for p in self.pieces]


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


def _flat_pieces(params, shapes, offsets, part_start, part_size, gi) -> list[_Piece]:
    pieces = []
    for j, (shape, off) in enumerate(zip(shapes, offsets)):
        n = math.prod(shape)
        lo, hi = max(off, part_start), min(off + n, part_start + part_size)
        if lo < hi:
            pieces.append(_Piece((gi, j), tuple(shape), lo - off, hi - lo, lo - part_start))
    return pieces


def _partitions(zero, kind: str, names: dict) -> list[_Partition]:
    """Every fp32 partition of the ZeRO optimizer ``zero`` with the parameter pieces it holds."""
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
            pieces = _flat_pieces(params, shapes, _round_robin_offsets(zero, i), rank * size, size, i)
            out.append(_Partition(flat, pg, pieces, [names.get(id(params[p.key[1]])) for p in pieces], rank, world))
    elif kind == "bf16":
        for i, flat in enumerate(zero.fp32_groups_flat_partition):
            pg = zero.real_dp_process_group[i]
            rank, world = dist.get_rank(group=pg), dist.get_world_size(group=pg)
            params = zero.bf16_groups[i]
            shapes = [tuple(p.shape) for p in params]
            offsets = [sum(math.prod(s) for s in shapes[:j]) for j in range(len(shapes))]
            size = flat.numel()
            pieces = _flat_pieces(params, shapes, offsets, rank * size, size, i)
            out.append(_Partition(flat, pg, pieces, [names.get(id(params[p.key[1]])) for p in pieces], rank, world))
    elif kind == "zero3":
        for i, flat in enumerate(zero.fp32_partitioned_groups_flat):
            pg = zero._get_sub_group_process_group(i)
            rank, world = dist.get_rank(group=pg), dist.get_world_size(group=pg)
            pieces, names_i, offset = [], [], 0
            for j, p in enumerate(zero.fp16_groups[i]):
                size = int(p.partition_numel())
                n = int(p.ds_numel)
                start = rank * size
                held = max(0, min(n - start, size))
                if held:
                    pieces.append(_Piece((i, j), tuple(p.ds_shape), start, held, offset))
                    names_i.append(names.get(id(p)))
                offset += size
            if offset != flat.numel():
                raise RuntimeError(f"ZeRO-3 sub group {i}: the fp32 partition has {flat.numel()} elements, "
                                   f"its parameters' partitions {offset}")
            out.append(_Partition(flat, pg, pieces, names_i, rank, world))
    return out


# ---- the adapter ---------------------------------------------------------------------------------
class ZeroAdapter:
    """``MicroAdam.engine_adapter`` for DeepSpeed: steps and checkpoints ZeRO partitions.

    It finds the ZeRO optimizer lazily: from the engine it was given (or that built the optimizer),
    else from the call stack (the ZeRO optimizer is the caller of ``step``/``state_dict``/
    ``load_state_dict``). Without a partitioning wrapper (stage 0) it steps nothing itself.
    """

    def __init__(self, engine=None, zero=None):
        self._engine_ref = weakref.ref(engine) if engine is not None else None
        self.zero = None
        self.kind = None
        self._plain = False
        self.partitions: dict[int, _Partition] = {}  # id(fp32 partition) -> layout
        if zero is not None:
            self.bind(zero)

    @property
    def engine(self):
        return self._engine_ref() if self._engine_ref is not None else None

    def bind(self, zero) -> None:
        kind = _wrapper_kind(zero)
        if kind is None:
            raise TypeError(f"{type(zero).__name__} is not a DeepSpeed ZeRO optimizer")
        if getattr(zero, "elastic_checkpoint", False):
            raise ValueError("MicroAdam does not support \"elastic_checkpoint\": true (DeepSpeed would slice "
                             "its state as if it were Adam's); set it to false")
        if getattr(zero, "swap_optimizer", False):
            raise ValueError("MicroAdam does not support optimizer offload to NVMe; offload to \"cpu\" instead")
        engine = self.engine
        names = {}
        if engine is not None and getattr(engine, "param_names", None):
            names = {id(p): n for p, n in engine.param_names.items()}
        self.zero, self.kind = zero, kind
        self.partitions = {id(part.flat): part for part in _partitions(zero, kind, names)}

    def _resolve(self, opt):
        if self.zero is not None or self._plain:
            return self.zero
        engine = self.engine
        candidate = getattr(engine, "optimizer", None) if engine is not None else None
        if candidate is not None and _wrapper_kind(candidate) is None:
            self._plain = True  # stage 0: the engine's optimizer is MicroAdam itself or a bf16/fp16 wrapper
            return None
        if _wrapper_kind(candidate) is None:
            candidate = _wrapper_on_stack(opt)
        if candidate is not None and _wrapper_kind(candidate) is not None:
            if getattr(candidate, "optimizer", None) is not opt:
                raise RuntimeError("the engine's ZeRO optimizer does not wrap this MicroAdam")
            if engine is None:  # built by hand: the engine driving this call, for names and the guard
                engine = _engine_on_stack()
                if engine is not None and getattr(engine, "optimizer", None) is candidate:
                    self._engine_ref = weakref.ref(engine)
                    _guard_checkpoint_loads(engine)
            self.bind(candidate)
        return self.zero

    # -- state of one partition: flat tensors, per-piece views ------------------------------------
    def _segments(self, part: _Partition, group: dict) -> list[Segment]:
        flat, grad = part.flat, part.flat.grad
        segs = []
        for piece in part.pieces:
            geom = geometry_for(piece.shape, group["block_size"], group["quant_bucket_size"], float(group["density"]))
            lo, hi = piece.offset, piece.offset + piece.numel
            segs.append(Segment(key=piece.key, geometry=geom, start=piece.start, param=flat.data[lo:hi],
                                grad=None if grad is None else grad.view(-1)[lo:hi], group=group))
        return segs

    @staticmethod
    def _sizes(segs: list[Segment]) -> list[tuple[int, int, int, int, int]]:
        """Per segment: owned blocks (b0, b1) and its (window, ef byte, bucket) state sizes."""
        out = []
        for seg in segs:
            b0, b1 = seg.owned_blocks()
            out.append((b0, b1, *seg.geometry.state_sizes(b0, b1)))
        return out

    @classmethod
    def expected_state(cls, segs, window_size) -> dict[str, tuple]:
        sizes = cls._sizes(segs)
        k, e, q = (sum(s[i] for s in sizes) for i in (2, 3, 4))
        return {"step": (len(segs),), "window_idx": (window_size, k), "window_val": (window_size, k),
                "ef_codes": (e,), "ef_stats": (q, 2)}

    @classmethod
    def _views(cls, segs, state) -> dict:
        views, k0, e0, q0 = {}, 0, 0, 0
        for j, (seg, (_, _, k, e, q)) in enumerate(zip(segs, cls._sizes(segs))):
            views[seg.key] = {
                "step": state["step"][j],
                "window_idx": state["window_idx"][:, k0:k0 + k],
                "window_val": state["window_val"][:, k0:k0 + k],
                "ef_codes": state["ef_codes"][e0:e0 + e],
                "ef_stats": state["ef_stats"][q0:q0 + q],
            }
            k0, e0, q0 = k0 + k, e0 + e, q0 + q
        return views

    def _pack(self, opt, part: _Partition, segs, group, fresh: dict) -> None:
        """Store the per-segment state ShardedStepper created (first step) as the partition's flat tensors."""
        state = opt.state[part.flat]
        for key, shape in self.expected_state(segs, group["window_size"]).items():
            device = "cpu" if key == "step" else part.flat.device
            state[key] = torch.zeros(shape, dtype=STATE_DTYPES[key], device=device)
        for key, view in self._views(segs, state).items():
            for name, value in fresh[key].items():  # empty for a parameter skipped for a non-finite grad
                view[name].copy_(value)

    # -- the engine_adapter protocol --------------------------------------------------------------
    def step_group(self, opt, group_index: int, group: dict) -> bool:
        if self._resolve(opt) is None:
            return False  # stage 0: whole (replicated) parameters, MicroAdam's own step
        for p in group["params"]:  # ZeRO-3 shows inactive groups with no params: nothing to do
            part = self.partitions.get(id(p))
            if part is None:
                raise RuntimeError("MicroAdam was handed a tensor that is none of DeepSpeed's ZeRO partitions; "
                                   "was the ZeRO optimizer rebuilt after attach()?")
            if part.flat.grad is None:  # every rank alike: DeepSpeed sets all partitions' grads together
                continue
            segs = self._segments(part, group)
            state = opt.state[part.flat]
            # On the first step the stepper creates each segment's state itself (so an lr-0, zero-gradient
            # first step only creates state, as for unsharded parameters); it is then packed flat.
            views = self._views(segs, state) if state else {seg.key: {} for seg in segs}
            skipped = part.stepper.step(segs, views, opt.chunk_elements, opt.blocks_fn(part.flat.device))
            if not state:
                self._pack(opt, part, segs, group, views)
            for key in skipped:
                opt._nonfinite(f"parameter {key[1]} of DeepSpeed group {key[0]}")
        return True

    def _indexed(self, opt):
        """(state_dict index, partition or None, group) for every parameter the optimizer holds."""
        index = 0
        for group in opt.param_groups:
            for p in group["params"]:
                yield index, self.partitions.get(id(p)), group
                index += 1

    def state_dict(self, opt, sd: dict) -> dict:
        if self._resolve(opt) is None:
            return _plain_state_dict(opt)
        layout = {"version": LAYOUT_VERSION, "kind": self.kind, "partitions": {}}
        for index, part, _ in self._indexed(opt):
            if part is None:
                raise RuntimeError("a parameter of this MicroAdam is not a ZeRO partition")
            layout["partitions"][index] = {"rank": part.rank, "world_size": part.world, "pieces": part.describe(),
                                           "names": list(part.names)}
        sd[LAYOUT_KEY] = layout
        return sd

    def load_state_dict(self, opt, sd: dict):
        saved_layout = sd.get(LAYOUT_KEY)
        if self._resolve(opt) is None:
            if saved_layout is not None:
                raise MicroAdamCheckpointError(_reshard_hint(
                    "this optimizer state was saved by MicroAdam under DeepSpeed ZeRO and is being loaded "
                    "without ZeRO partitions"))
            return sd
        if saved_layout is None:
            raise MicroAdamCheckpointError(_reshard_hint(
                "this optimizer state has no ZeRO layout: it was not saved by MicroAdam under DeepSpeed ZeRO "
                "(a canonical, unsharded state_dict?)"))
        groups = sd.get("param_groups", [])
        if len(groups) != len(opt.param_groups):
            raise MicroAdamCheckpointError(_reshard_hint(
                f"the checkpoint has {len(groups)} parameter groups, this optimizer {len(opt.param_groups)}"))
        for i, (saved, group) in enumerate(zip(groups, opt.param_groups)):
            for key in GEOMETRY_KEYS:
                if not same_geometry_setting(key, saved.get(key), group[key]):
                    raise ValueError(f"cannot load MicroAdam state saved with {key}={saved.get(key)!r} into an "
                                     f"optimizer with {key}={group[key]!r} (parameter group {i})")
            if len(saved["params"]) != len(group["params"]):
                raise MicroAdamCheckpointError(_reshard_hint(
                    f"parameter group {i}: the checkpoint has {len(saved['params'])} partitions, this "
                    f"optimizer {len(group['params'])}"))
        saved_parts = saved_layout["partitions"]
        loaded = {}
        for index, part, group in self._indexed(opt):
            info = saved_parts.get(index)
            if info is None or info["world_size"] != part.world or info["rank"] != part.rank:
                got = "none" if info is None else f"rank {info['rank']} of {info['world_size']}"
                raise MicroAdamCheckpointError(_reshard_hint(
                    f"partition {index}: the checkpoint was saved by {got}, this is rank {part.rank} of "
                    f"{part.world}"))
            if [tuple(map(_tuple, d)) for d in info["pieces"]] != [tuple(map(_tuple, d)) for d in part.describe()]:
                raise MicroAdamCheckpointError(_reshard_hint(
                    f"partition {index}: the checkpoint's parameter pieces differ from this run's (another "
                    "model, parameter grouping or ZeRO configuration)"))
            st = sd["state"].get(index)
            if st is None:
                continue
            segs = self._segments(part, group)
            for key, shape in self.expected_state(segs, group["window_size"]).items():
                value = st.get(key)
                if not isinstance(value, torch.Tensor) or value.dtype != STATE_DTYPES[key] \
                        or tuple(value.shape) != shape:
                    got = (value.dtype, tuple(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__
                    raise MicroAdamCheckpointError(_reshard_hint(
                        f"state {key!r} of partition {index} is {got}, expected {STATE_DTYPES[key]} {shape}"))
            loaded[part.flat] = {k: st[k].to("cpu" if k == "step" else part.flat.device, copy=True)
                                 for k in self.expected_state(segs, group["window_size"])}
        hyper = {k: v for k, v in sd.items() if k != LAYOUT_KEY}
        torch.optim.Optimizer.load_state_dict(opt, {**hyper, "state": {}})
        for flat, st in loaded.items():
            opt.state[flat] = st
        return None


def _tuple(x):
    return tuple(_tuple(y) for y in x) if isinstance(x, (list, tuple)) else x


def _plain_state_dict(opt):
    """Stage 0: MicroAdam's own canonical state_dict, as if it had no adapter."""
    adapter = opt.engine_adapter
    try:
        opt.engine_adapter = None
        return MicroAdam.state_dict(opt)
    finally:
        opt.engine_adapter = adapter


class DeepSpeedMicroAdam(MicroAdam):
    """MicroAdam that maps DeepSpeed ZeRO partitions by itself (what ``"type": "MicroAdam"`` builds).

    Built by DeepSpeed from the JSON config, it finds the engine that is building it on the call
    stack; built by hand, pass it to ``deepspeed.initialize(optimizer=...)``: it then finds the ZeRO
    optimizer when that calls its ``step`` (or use :func:`initialize` / :func:`attach`).
    """

    def __init__(self, params, *args, **kwargs):
        super().__init__(params, *args, **kwargs)
        engine = _engine_on_stack()
        self.engine_adapter = ZeroAdapter(engine=engine)
        if engine is not None:
            _guard_checkpoint_loads(engine)


def register_with_torch_optim() -> None:
    """Make ``"optimizer": {"type": "MicroAdam"}`` resolve in DeepSpeed configs.

    DeepSpeed matches its own optimizer names case-insensitively and any other name with
    ``getattr(torch.optim, name)`` (``DeepSpeedEngine._configure_basic_optimizer``), so this sets
    ``torch.optim.MicroAdam``. Idempotent; never replaces another library's ``torch.optim.MicroAdam``.
    """
    existing = getattr(torch.optim, "MicroAdam", None)
    if existing is None or existing is DeepSpeedMicroAdam:
        torch.optim.MicroAdam = DeepSpeedMicroAdam
    elif not (isinstance(existing, type) and issubclass(existing, MicroAdam)):
        raise RuntimeError(f"torch.optim.MicroAdam is already {existing!r}, not microadam_dist's")


# ---- checkpoint loads at any world size -------------------------------------------------------------
#: what DeepSpeed's _load_checkpoint keeps out of the client state it returns
_DEEPSPEED_STATES = ("module", "skipped_steps", "global_steps", "dp_world_size", "mp_world_size", "data_sampler",
                     "random_ltd")


def _guard_checkpoint_loads(engine) -> None:
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

    def load_checkpoint(load_dir, tag=None, load_module_strict=True, load_optimizer_states=True,
                        load_lr_scheduler_states=True, load_module_only=False, custom_load_fn=None):
        args = dict(load_module_strict=load_module_strict, load_optimizer_states=load_optimizer_states,
                    load_lr_scheduler_states=load_lr_scheduler_states, load_module_only=load_module_only,
                    custom_load_fn=custom_load_fn)
        if getattr(engine, "load_universal_checkpoint", lambda: False)():
            raise MicroAdamCheckpointError(_reshard_hint(
                "DeepSpeed universal checkpoints know only Adam's state (exp_avg, exp_avg_sq), not MicroAdam's"))
        if tag is None and os.path.isfile(os.path.join(load_dir, "latest")):
            with open(os.path.join(load_dir, "latest")) as f:
                tag = f.read().strip()
        native = tag is None or custom_load_fn is not None or _native_load_fits(engine, os.path.join(load_dir, str(tag)))
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
    from .checkpoint import _RANK_FILE, CheckpointError, DeepSpeedCheckpoint

    opt = engine.basic_optimizer
    adapter = opt.engine_adapter if isinstance(opt, MicroAdam) else None
    if not isinstance(adapter, ZeroAdapter) or adapter._resolve(opt) is None or not os.path.isdir(tag_dir):
        return True  # stage 0 (world-size-free state) or not a checkpoint: DeepSpeed's own path
    files = {int(m.group(1)): f for f in os.listdir(tag_dir) if (m := _RANK_FILE.match(f))}
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
        _, layout, _ = DeepSpeedCheckpoint._load_rank_file(os.path.join(tag_dir, files[rank]))
    except CheckpointError:
        return True  # another optimizer's file: the adapter refuses it with its own message
    return _layout_matches(mine, layout["partitions"])


def _layout_matches(mine: dict, saved: dict) -> bool:
    if set(mine) != {int(i) for i in saved}:
        return False
    for index, info in saved.items():
        part = mine[int(index)]
        if info["world_size"] != part.world or info["rank"] != part.rank or \
                [tuple(map(_tuple, d)) for d in info["pieces"]] != [tuple(map(_tuple, d)) for d in part.describe()]:
            return False
    return True


def _load_resharded(engine, tag_dir, *, load_module_strict=True, load_optimizer_states=True,
                    load_lr_scheduler_states=True, load_module_only=False, custom_load_fn=None):
    """``engine.load_checkpoint`` for a MicroAdam ZeRO checkpoint of another size or layout: weights,
    fp32 masters and MicroAdam state through :func:`load_canonical`, then what DeepSpeed's own load
    restores from the model-states file (LR scheduler, step counters) and its client state."""
    from pathlib import Path

    from .checkpoint import CheckpointError, DeepSpeedCheckpoint

    ckpt = DeepSpeedCheckpoint(Path(tag_dir))
    models = sorted(Path(tag_dir).glob("*model_states.pt"))  # ZeRO-3 writes one per rank: rank 0's is read
    if not models:
        raise CheckpointError(f"{tag_dir} has no *model_states.pt: the DeepSpeed checkpoint is incomplete")
    saved = torch.load(models[0], map_location="cpu", weights_only=False)
    states = load_optimizer_states and not load_module_only
    load_canonical(engine, ckpt, load_state=states)
    deepspeed_states = ["module"]
    if not load_module_only:
        if states:  # the hyperparameters the schedulers set: the first resumed step uses them
            for group, saved_group in zip(engine.basic_optimizer.param_groups, ckpt.groups):
                group.update({k: (tuple(v) if k == "betas" else v) for k, v in saved_group.items()
                              if k in ("lr", "betas", "eps", "weight_decay") and v is not None})
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


# ---- user entry points ----------------------------------------------------------------------------
def attach(engine) -> ZeroAdapter:
    """Teach the engine's MicroAdam DeepSpeed's partition layout (after ``deepspeed.initialize``)."""
    zero = engine.optimizer
    opt = engine.basic_optimizer if getattr(engine, "basic_optimizer", None) is not None else zero
    if not isinstance(opt, MicroAdam):
        raise TypeError(f"the engine's optimizer is {type(opt).__name__}, not MicroAdam")
    adapter = ZeroAdapter(engine=engine)
    if _wrapper_kind(zero) is not None:
        adapter.bind(zero)
    opt.engine_adapter = adapter
    _guard_checkpoint_loads(engine)
    return adapter


def _load_config(config) -> dict:
    if isinstance(config, dict):
        return copy.deepcopy(config)
    with open(config) as f:
        return json.load(f)


def initialize(model, config, model_parameters=None, deepspeed_kwargs: dict | None = None, **microadam_kwargs):
    """``deepspeed.initialize`` with a MicroAdam built from ``microadam_kwargs``.

    ``config`` is a dict or a JSON file. Its ``"optimizer"`` entry, if any, must be MicroAdam's (and
    then ``microadam_kwargs`` override its params). ``"zero_allow_untested_optimizer"`` is set, and with
    ``offload_optimizer`` so is ``"zero_force_ds_cpu_optimizer": false``. Returns DeepSpeed's tuple
    ``(engine, optimizer, dataloader, lr_scheduler)``.
    """
    import deepspeed

    cfg = _load_config(config)
    entry = cfg.pop("optimizer", None)
    params = {}
    if entry is not None:
        if entry.get("type") != "MicroAdam":
            raise ValueError(f"the config's optimizer is {entry.get('type')!r}; initialize() builds MicroAdam")
        params = dict(entry.get("params", {}))
    params.update(microadam_kwargs)
    cfg["zero_allow_untested_optimizer"] = True
    offload = cfg.get("zero_optimization", {}).get("offload_optimizer") or {}
    if offload.get("device", "none") != "none":
        cfg.setdefault("zero_force_ds_cpu_optimizer", False)
    if model_parameters is None:
        model_parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = DeepSpeedMicroAdam(model_parameters, **params)
    out = deepspeed.initialize(model=model, optimizer=optimizer, config=cfg, **(deepspeed_kwargs or {}))
    attach(out[0])
    return out


# ---- the canonical (world-size-free) state -------------------------------------------------------
def gather_canonical_state(optimizer, by_name: bool = False) -> dict[Any, dict[str, torch.Tensor]]:
    """Every parameter's state in the canonical row form (``functional.canonical_shapes``), on every rank.

    Keys are ``(DeepSpeed group index, index in that group)``: the order of the ``param_shapes`` that
    DeepSpeed writes into its model-states file, so names follow from it; with ``by_name`` they are the
    parameters' names (known when the adapter knows the engine). A collective: every rank of the
    data-parallel group must call it. This is the conversion tool's input; the tests compare it with
    one process.
    """
    adapter = optimizer.engine_adapter
    if not isinstance(adapter, ZeroAdapter) or adapter._resolve(optimizer) is None:
        raise ValueError("gather_canonical_state needs a MicroAdam stepping DeepSpeed ZeRO partitions")
    pieces: dict[tuple, list] = {}
    meta: dict[tuple, tuple] = {}
    names: dict[tuple, str | None] = {}
    for group in _groups_of(optimizer, adapter):
        for part in group[1]:
            segs = adapter._segments(part, group[0])
            state = optimizer.state.get(part.flat)
            mine = []
            if state:
                for seg, view, name in zip(segs, adapter._views(segs, state).values(), part.names):
                    b0, b1 = seg.owned_blocks()
                    mine.append((seg.key, name, seg.geometry.shape, b0, b1,
                                 {k: v.cpu().clone() for k, v in view.items()}))
            everyone = [None] * part.world
            if part.world > 1:
                dist.all_gather_object(everyone, mine, group=part.process_group)
            else:
                everyone = [mine]
            for rank_pieces in everyone:
                for key, name, shape, b0, b1, st in rank_pieces:
                    pieces.setdefault(key, []).append((b0, b1, st))
                    meta[key] = (shape, group[0])
                    names[key] = name
    out = {}
    for key, items in sorted(pieces.items()):
        shape, group = meta[key]
        geom = geometry_for(shape, group["block_size"], group["quant_bucket_size"], float(group["density"]))
        if by_name and names[key] is None:
            raise ValueError("parameter names are unknown: use attach(engine) or the JSON config path")
        try:
            out[names[key] if by_name else key] = join_owned_blocks(items, geom, group["window_size"])
        except ValueError as e:
            raise RuntimeError(f"parameter {key}: {e}") from e
    return out


def _groups_of(optimizer, adapter):
    """(param group, [partitions]) in DeepSpeed's order, the same on every rank.

    Stage 1/2 and the bf16 optimizer show every partition in ``param_groups``; ZeRO-3 shows them
    only during its step, so its sub groups are listed from the ZeRO optimizer.
    """
    zero = adapter.zero
    if adapter.kind == "zero3":
        for sub, flat in enumerate(zero.fp32_partitioned_groups_flat):
            yield optimizer.param_groups[zero.sub_group_to_group_id[sub]], [adapter.partitions[id(flat)]]
    else:
        for group in optimizer.param_groups:
            yield group, [adapter.partitions[id(p)] for p in group["params"]]


def skip_cpu_shm_build() -> None:
    """On CPU, keep DeepSpeed from JIT-compiling its shared-memory all-reduce op (over a minute with a
    C++ compiler, once per machine): only its inference path uses it; training goes through gloo."""
    import deepspeed

    if not torch.cuda.is_available():
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


# ---- checkpoints at any world size ------------------------------------------------------------
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
    from .checkpoint import CheckpointError, DeepSpeedCheckpoint, open_checkpoint

    try:
        ckpt, local = open_checkpoint(path), None
    except CheckpointError as e:
        ckpt, local = None, str(e)
    everyone = _everyone((local, isinstance(ckpt, DeepSpeedCheckpoint)))
    failed = [(rank, error) for rank, (error, _) in enumerate(everyone) if error is not None]
    if failed:  # on every rank, so none is left waiting in a collective
        raise CheckpointError("; ".join(f"rank {rank}: {error}" for rank, error in failed))
    if all(is_ds for _, is_ds in everyone):
        _guard_checkpoint_loads(engine)
        path = os.fspath(path)
        if os.path.isfile(os.path.join(path, "latest")):
            engine.load_checkpoint(path)
        else:  # the tag directory itself
            engine.load_checkpoint(os.path.dirname(os.path.abspath(path)), tag=os.path.basename(os.path.abspath(path)))
        return None
    load_canonical(engine, ckpt, progress=progress)
    return ckpt


def load_canonical(engine, ckpt, *, progress: bool = False, load_state: bool = True) -> None:
    """Load an opened checkpoint (``checkpoint.Checkpoint``) into a ZeRO-1/2/3 engine at any world size.

    Every rank reads the parameters its partitions hold (one at a time) and refuses another
    model or MicroAdam geometry before changing anything. ``load_state=False``: the weights only
    (MicroAdam starts afresh).
    """
    from .checkpoint import CheckpointError, canonical_parameter, check_compatible
    from .functional import from_row_form

    opt = engine.basic_optimizer
    if not isinstance(opt, MicroAdam):
        raise TypeError(f"the engine's optimizer is {type(opt).__name__}, not MicroAdam")
    adapter = opt.engine_adapter
    if not isinstance(adapter, ZeroAdapter):
        adapter = attach(engine)
    if adapter._resolve(opt) is None:
        raise CheckpointError("load_canonical needs a ZeRO-1/2/3 engine; with stage 0 use "
                              "microadam_dist.checkpoint.load(engine.module, optimizer, path)")
    module_params = dict(engine.module.named_parameters())
    shapes = {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in module_params.items() if p.requires_grad}
    groups = {}
    for group, parts in _groups_of(opt, adapter):
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
        for group, parts in _groups_of(opt, adapter):
            for part in parts:
                segs = adapter._segments(part, group)
                fresh, any_state = {}, False
                for seg, piece, name in zip(segs, part.pieces, part.names):
                    weight, st = values[name]
                    if weight is not None:
                        flat_weight = weight.reshape(-1)[piece.start:piece.start + piece.numel]
                        part.flat.data[piece.offset:piece.offset + piece.numel].copy_(flat_weight)
                        if adapter.kind == "zero3":  # the module's bit16 partition of this parameter
                            lp = zero.fp16_groups[piece.key[0]][piece.key[1]]
                            lp.ds_tensor.data[:piece.numel].copy_(flat_weight.to(lp.ds_tensor.dtype))
                    b0, b1 = seg.owned_blocks()
                    fresh[seg.key] = {} if st is None else from_row_form(st, seg.geometry, group["window_size"], b0, b1)
                    any_state |= st is not None
                if any_state:
                    adapter._pack(opt, part, segs, group, fresh)
                else:
                    opt.state.pop(part.flat, None)
        if adapter.kind != "zero3":  # stage 1/2: every rank holds the whole module in bit16
            for name in shapes:
                weight = values[name][0] if name in values else ckpt.weight(name)
                if weight is not None:
                    module_params[name].data.copy_(weight.reshape(module_params[name].shape))
    if ckpt.step is not None:
        engine.global_steps = int(ckpt.step)
    dist.barrier()


# ---- a small DeepSpeed training job (what launch/*deepspeed*.sh run) -------------------------------
def main(argv: list[str] | None = None) -> list[float]:
    """Train the small GPT on CPython's documentation with DeepSpeed and a MicroAdam JSON config.

        deepspeed --hostfile launch/hostfile.sample --module microadam_dist.deepspeed_zero \\
            --deepspeed_config configs/ds_zero2.json --steps 100
        launch/torchrun_deepspeed.sh --deepspeed_config configs/ds_zero3.json --steps 100

    Every run sees the same global batches whatever the world size (each rank takes its slice).
    ``--save DIR`` writes an ``engine.save_checkpoint`` at the end, ``--load DIR`` resumes from one.
    """
    import argparse

    import deepspeed

    from .data import get_batch, split_corpus
    from .distributed import collective_device, init_process_group
    from .models import GPT, GPTConfig

    ap = argparse.ArgumentParser(description=main.__doc__.split("\n")[0])
    ap.add_argument("--deepspeed_config", "--config", dest="config", default="configs/ds_zero2.json")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--global-batch", type=int, default=None,
                    help="sequences per step, all ranks together [micro batch x accumulation x world]")
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--fp32", action="store_true", help="turn the config's bf16 off")
    ap.add_argument("--save", default=None)
    ap.add_argument("--load", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher's
    args = ap.parse_args(argv)

    register_with_torch_optim()
    skip_cpu_shm_build()
    if "RANK" in os.environ and not dist.is_initialized():
        init_process_group()  # a torchrun-restarted worker needs its own store namespace
    deepspeed.init_distributed(dist_backend="gloo" if not torch.cuda.is_available() else None)
    cfg = _load_config(args.config)
    if args.fp32:
        cfg["bf16"] = {"enabled": False}
    rank, world = dist.get_rank(), dist.get_world_size()
    micro = int(cfg.get("train_micro_batch_size_per_gpu", 4))
    accum = int(cfg.get("gradient_accumulation_steps", 1))
    global_batch = args.global_batch or micro * accum * world
    if global_batch % (micro * accum * world):
        raise SystemExit(f"--global-batch {global_batch} is not a multiple of micro batch {micro} x "
                         f"accumulation {accum} x world {world}")
    cfg.pop("train_batch_size", None)
    cfg["gradient_accumulation_steps"] = accum = global_batch // (micro * world)
    torch.manual_seed(args.seed)
    model = GPT(GPTConfig(block_size=args.context, n_layer=args.layers, n_head=args.heads, n_embd=args.width))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    if args.load:
        engine.load_checkpoint(args.load)
    train, _ = split_corpus()
    gen = torch.Generator().manual_seed(args.seed + 1)
    start = engine.global_steps
    for _ in range(start):  # the batches of the steps already taken
        get_batch(train, global_batch, args.context, gen)
    losses = []
    device = engine.device
    for step in range(start, args.steps):
        x, y = get_batch(train, global_batch, args.context, gen)
        share = global_batch // world
        x, y = x[rank * share:(rank + 1) * share].to(device), y[rank * share:(rank + 1) * share].to(device)
        total = torch.zeros((), dtype=torch.float64, device=collective_device(like=device))
        for xm, ym in zip(x.chunk(accum), y.chunk(accum)):
            loss = engine(xm, ym)
            engine.backward(loss)
            engine.step()
            total += loss.detach().double().to(total.device) / accum
        dist.all_reduce(total)
        losses.append(total.item() / world)
        if rank == 0 and not args.quiet:
            print(f"step {step + 1}/{args.steps} loss {losses[-1]:.4f} (world size {world})", flush=True)
    if args.save:
        engine.save_checkpoint(args.save)
    if rank == 0:
        opt = engine.basic_optimizer
        print(f"done: {len(losses)} steps, world size {world}, ZeRO stage {engine.zero_optimization_stage()}, "
              f"{type(engine.optimizer).__name__}, MicroAdam state {opt.state_bytes()} bytes on rank 0", flush=True)
    engine.destroy()  # its autograd hooks would keep the engine, and its process groups, alive
    return losses


if __name__ == "__main__":
    from .distributed import destroy_process_group

    main()
    destroy_process_group()  # joins the groups' threads: none may outlive the interpreter
