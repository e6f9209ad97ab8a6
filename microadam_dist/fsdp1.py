"""FSDP1 (``FullyShardedDataParallel``): MicroAdam on flat parameter shards.

FSDP1 hands the optimizer either its ``FlatParameter`` shards (``use_orig_params=False``) or
1-D views of each original parameter's local part (``use_orig_params=True``). Neither says
which global elements it holds, so the optimizer is told once, from the FSDP module tree:

    model = FSDP(model, device_id=..., use_orig_params=...)
    opt = MicroAdam(model.parameters(), lr=...)
    microadam_dist.fsdp1.attach(opt, model)

Each original parameter's local part becomes a ``sharded.Segment`` of its global geometry, so
the step is exactly the single-process one. State checkpoints: ``opt.state_dict()`` per rank
(reloaded at the same world size); resharding goes through FSDP2/DCP or the conversion tool.
"""

from __future__ import annotations

import torch.nn as nn

from .engine import StepWork, install
from .geometry import geometry_of
from .hyperparams import check_same_geometry
from .sharded import Segment


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
        raise ValueError(
            "none of the optimizer's parameters belong to the FSDP1 model; build the "
            "optimizer from the wrapped model's parameters()"
        )
    optimizer.engine = FSDP1Engine(where)


class FSDP1Engine:
    """The engine (``engine.Engine``) of a MicroAdam whose parameters are FSDP1 shards.

    ``optimizer.state[p]`` of a shard is ``{j: flat state of original parameter j's owned blocks}``
    for the original parameters it holds a part of; state_dicts are per rank, as they are.
    """

    def __init__(self, where: dict):
        self.where = where

    def _segments(self, group_index, group, p, param_index) -> tuple:
        """(process group, [(original parameter index j, Segment)]) of one optimizer parameter."""
        handle, i = self.where[id(p)]
        flat = handle.flat_param
        indices = range(len(flat._shard_param_infos)) if i is None else [i]
        out = []
        for j in indices:
            info = flat._shard_param_infos[j]
            if not info.in_shard:
                continue
            if i is None:  # a FlatParameter: the slice is a range of the local flat shard
                lo, hi = info.offset_in_shard, info.offset_in_shard + info.numel_in_shard
                param, grad = p.data[lo:hi], None if p.grad is None else p.grad[lo:hi]
            else:  # an original parameter: its local part, already flattened
                param, grad = p.data.view(-1), None if p.grad is None else p.grad.view(-1)
            key = (group_index, param_index, j)
            out.append(
                (
                    j,
                    Segment(
                        key=key,
                        geometry=geometry_of(flat._shapes[j], group),
                        start=info.intra_param_start_idx,
                        param=param,
                        grad=grad,
                        group=group,
                    ),
                )
            )
        return handle.process_group, out

    def segments(self, optimizer, group_index: int, group: dict) -> list[StepWork]:
        by_pg: dict = {}
        for param_index, p in enumerate(group["params"]):
            if id(p) not in self.where:
                raise ValueError(
                    "a parameter group mixes FSDP1 parameters with others; give the "
                    "non-FSDP1 parameters their own group"
                )
            pg, segs = self._segments(group_index, group, p, param_index)
            per_param = optimizer.state[p]  # {j: state}
            by_pg.setdefault(pg, []).extend((per_param, j, seg) for j, seg in segs)
        return [self._work(optimizer, group_index, pg, items) for pg, items in by_pg.items()]

    @staticmethod
    def _work(optimizer, group_index, pg, items) -> StepWork:
        def finish():  # no empty entries for parts skipped before their first step
            for per_param, j, _ in items:
                if not per_param.get(j):
                    per_param.pop(j, None)
            for p in [p for p, st in optimizer.state.items() if isinstance(st, dict) and not st]:
                del optimizer.state[p]

        return StepWork(
            key=(group_index, pg),
            process_group=pg,
            local=False,
            segments=[seg for *_, seg in items],
            states={seg.key: per_param.setdefault(j, {}) for per_param, j, seg in items},
            describe=lambda key: f"part {key[2]} of parameter {key[1]} of group {key[0]} (FSDP1)",
            finish=finish,
        )

    def state_dict(self, optimizer) -> dict:
        import torch

        return torch.optim.Optimizer.state_dict(optimizer)

    def load_state_dict(self, optimizer, sd: dict) -> None:
        check_same_geometry(sd["param_groups"], optimizer.param_groups)
        index, loaded = 0, {}
        for group_index, group in enumerate(optimizer.param_groups):
            for param_index, p in enumerate(group["params"]):
                if index in sd["state"]:
                    per_param = sd["state"][index]
                    _, segs = self._segments(group_index, group, p, param_index)
                    expected = dict(segs)
                    if set(per_param) != set(expected):
                        raise ValueError(
                            f"the saved FSDP1 state of parameter {index} covers the parts of original parameters "
                            f"{sorted(per_param)}, this rank holds {sorted(expected)}: it was saved at another world "
                            "size or for another model (reshard it with `microadam-ckpt reshard`)"
                        )
                    loaded[p] = {}
                    for j, st in per_param.items():
                        layout = expected[j].state_layout()
                        layout.check(
                            st,
                            f"part {j} of parameter {index}",
                            hint="this rank's shard differs: saved at another world size or for another model",
                        )
                        loaded[p][j] = layout.install(st, p.device)
                index += 1
        install(optimizer, sd, loaded)
