"""FSDP1 (``FullyShardedDataParallel``): MicroAdam on flat parameter shards.

FSDP1 hands the optimizer either its ``FlatParameter`` shards (``use_orig_params=False``) or
1-D views of each original parameter's local piece (``use_orig_params=True``). Neither says
which global elements it holds, so the optimizer is told once, from the FSDP module tree:

    model = FSDP(model, device_id=..., use_orig_params=...)
    opt = MicroAdam(model.parameters(), lr=...)
    microadam_dist.fsdp1.attach(opt, model)

Each original parameter's local piece becomes a ``sharded.Segment`` of its global geometry, so
the step is exactly the single-process one. State checkpoints: ``opt.state_dict()`` per rank
(reloaded at the same world size); resharding goes through FSDP2/DCP or the conversion tool.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .functional import STATE_DTYPES
from .geometry import geometry_for, same_geometry_setting
from .sharded import Segment, ShardedStepper


def _fsdp1_handles(model: nn.Module):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return [m._handle for m in FSDP.fsdp_modules(model) if m._handle is not None]


def attach(optimizer, model: nn.Module) -> None:
    """Teach ``optimizer`` (a MicroAdam) the FSDP1 layout of ``model``'s parameters."""
    where = {}  # id(optimizer parameter) -> (handle, index of the original param or None)
    for handle in _fsdp1_handles(model):
        flat = handle.flat_param
        where[id(flat)] = (handle, None)
        for i, p in enumerate(flat._params or []):
            where[id(p)] = (handle, i)
    if not where:
        raise ValueError("attach() found no FullyShardedDataParallel module in the model")
    known = [p for g in optimizer.param_groups for p in g["params"] if id(p) in where]
    if not known:
        raise ValueError("none of the optimizer's parameters belong to the FSDP1 model; build the "
                         "optimizer from the wrapped model's parameters()")
    optimizer.engine_adapter = FSDP1Adapter(where)


class FSDP1Adapter:
    """engine_adapter of a MicroAdam whose parameters are FSDP1 shards."""

    def __init__(self, where: dict):
        self.where = where
        self.steppers: dict[Any, ShardedStepper] = {}

    def _segments(self, opt, group_index, group, p, param_index):
        handle, i = self.where[id(p)]
        flat = handle.flat_param
        indices = range(len(flat._shard_param_infos)) if i is None else [i]
        out = []
        for j in indices:
            info = flat._shard_param_infos[j]
            if not info.in_shard:
                continue
            geom = geometry_for(tuple(flat._shapes[j]), group["block_size"], group["quant_bucket_size"],
                                float(group["density"]))
            if i is None:  # a FlatParameter: the piece is a range of the local flat shard
                lo, hi = info.offset_in_shard, info.offset_in_shard + info.numel_in_shard
                param, grad = p.data[lo:hi], None if p.grad is None else p.grad[lo:hi]
            else:  # an original parameter: its local piece, already flattened
                param, grad = p.data.view(-1), None if p.grad is None else p.grad.view(-1)
            key = (group_index, param_index, j)
            out.append((key, Segment(key=key, geometry=geom, start=info.intra_param_start_idx,
                                     param=param, grad=grad, group=group)))
        return handle.process_group, out

    def step_group(self, opt, group_index: int, group: dict) -> bool:
        if not any(id(p) in self.where for p in group["params"]):
            return False
        by_pg: dict[Any, list] = {}
        for param_index, p in enumerate(group["params"]):
            if id(p) not in self.where:
                raise ValueError("a parameter group mixes FSDP1 parameters with others; give the "
                                 "non-FSDP1 parameters their own group")
            pg, segs = self._segments(opt, group_index, group, p, param_index)
            state = opt.state[p]  # {j: state of original param j's local blocks}
            by_pg.setdefault(pg, []).extend((state, key[2], seg) for key, seg in segs)
        for pg, items in by_pg.items():
            stepper = self.steppers.setdefault(pg, ShardedStepper(pg))
            states = {seg.key: state.setdefault(j, {}) for state, j, seg in items}
            device = items[0][2].param.device
            skipped = stepper.step([seg for _, _, seg in items], states, opt.chunk_elements, opt.blocks_fn(device))
            for key in skipped:
                opt._nonfinite(f"piece {key[2]} of parameter {key[1]} of group {key[0]} (FSDP1)")
        return True

    # per-rank state: saved and reloaded as it is, at the same world size
    def state_dict(self, opt, sd: dict) -> dict:
        return sd

    def load_state_dict(self, opt, sd: dict):
        saved_groups = sd["param_groups"]
        index = 0
        loaded = {}
        for group_index, (group, saved) in enumerate(zip(opt.param_groups, saved_groups)):
            for key in ("window_size", "density", "block_size", "quant_bucket_size"):
                if not same_geometry_setting(key, saved.get(key), group[key]):
                    raise ValueError(f"cannot load MicroAdam state saved with {key}={saved.get(key)!r} "
                                     f"into an optimizer with {key}={group[key]!r}")
            for param_index, p in enumerate(group["params"]):
                if index in sd["state"]:
                    per_param = sd["state"][index]
                    _, segs = self._segments(opt, group_index, group, p, param_index)
                    expected = {key[2]: seg for key, seg in segs}
                    if set(per_param) != set(expected):
                        raise ValueError(
                            f"the saved FSDP1 state of parameter {index} covers pieces {sorted(per_param)}, "
                            f"this rank holds {sorted(expected)}: it was saved at another world size or "
                            "for another model (reshard it with `microadam-ckpt reshard`)")
                    for j, st in per_param.items():
                        b0, b1 = expected[j].owned_blocks()
                        k, e, q = expected[j].geometry.state_sizes(b0, b1)
                        m = group["window_size"]
                        shapes = {"step": (), "window_idx": (m, k), "window_val": (m, k), "ef_codes": (e,),
                                  "ef_stats": (q, 2)}
                        for name, shape in shapes.items():
                            v = st.get(name)
                            if not isinstance(v, torch.Tensor) or v.dtype != STATE_DTYPES[name] \
                                    or tuple(v.shape) != shape:
                                raise ValueError(
                                    f"state {name!r} of piece {j} of parameter {index} does not match this "
                                    f"rank's shard (expected {STATE_DTYPES[name]} {shape}): saved at another "
                                    "world size or for another model")
                    loaded[p] = {j: {k: v.to("cpu" if k == "step" else p.device, copy=True) for k, v in st.items()}
                                 for j, st in per_param.items()}
                index += 1
        torch.optim.Optimizer.load_state_dict(opt, {**sd, "state": {}})
        for p, st in loaded.items():
            opt.state[p] = st
        return None
