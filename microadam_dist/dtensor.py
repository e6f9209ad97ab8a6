"""DTensor parameters (FSDP2 ``fully_shard``, HSDP): their local segment and their checkpointable state.

A DTensor parameter sharded on dim 0 holds a contiguous range of its global flat index on each rank:
whole rows for parameters of 2 or more dimensions (so whole blocks: no communication), any range for
1-D ones (``sharded.ShardedStepper`` exchanges the few elements of blocks that straddle two ranks).

For ``torch.distributed.checkpoint`` the state is exported in the row form
(``state.StateLayout.row_shapes``) as DTensors: sharded on the row dimension exactly like the
parameter for 2-D+ parameters, so DCP saves each row's state once and reshards it natively; and
gathered and replicated for 1-D parameters (their blocks are owned by the rank holding their first
element, which is not how DTensor cuts a dimension; 1-D parameters are small). Window indices are
exported as int32 (``state.EXPORT_INDEX_DTYPE``) and narrowed back on import.

``engine.ParamsEngine`` imports this module only once it sees a DTensor (``engine.is_dtensor``), so
``import microadam_dist`` does not pay for ``torch.distributed.tensor`` (over a second).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from .distributed import collective_device
from .geometry import Geometry
from .sharded import Segment
from .state import StateLayout, narrow_indices, widen_indices


def shard_mesh_dim(p: DTensor) -> int | None:
    """The mesh dimension that shards dim 0 (None when fully replicated); refuse other layouts."""
    dims = []
    for i, placement in enumerate(p.placements):
        if isinstance(placement, Shard) and placement.dim == 0 and type(placement) is Shard:
            dims.append(i)
        elif not isinstance(placement, Replicate):
            raise ValueError(
                f"MicroAdam supports DTensor parameters sharded on dim 0 (FSDP2 / HSDP), got "
                f"placements {p.placements}; tensor-parallel layouts are not supported"
            )
    if len(dims) > 1:
        raise ValueError(f"DTensor parameter sharded on dim 0 by several mesh dims: {p.placements}")
    return dims[0] if dims else None


def local_flat(t: DTensor) -> torch.Tensor:
    local = t.to_local()
    if not local.is_contiguous():
        raise ValueError("MicroAdam needs contiguous local shards of DTensor parameters")
    return local.view(-1)


def dtensor_segment(p: DTensor, key, geometry: Geometry, group: dict):
    """(Segment, process group) of the local shard of an FSDP2 parameter."""
    mesh_dim = shard_mesh_dim(p)
    _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    start = offset[0] * (geometry.numel // p.shape[0]) if p.dim() >= 1 and mesh_dim is not None else 0
    grad = None if p.grad is None else local_flat(p.grad)
    pg = None if mesh_dim is None else p.device_mesh.get_group(mesh_dim)
    return Segment(key=key, geometry=geometry, start=start, param=local_flat(p), grad=grad, group=group), pg


def _local_layout(p: DTensor, geometry: Geometry, window_size: int) -> StateLayout:
    """The state this rank keeps for ``p``: its owned blocks."""
    seg, _ = dtensor_segment(p, None, geometry, {"window_size": window_size})
    return seg.state_layout()


def _rows_sharded(p: DTensor) -> bool:
    return p.dim() >= 2 and shard_mesh_dim(p) is not None


def export_state(p: DTensor, state: dict, geometry: Geometry, window_size: int) -> dict:
    """The canonical row form of a DTensor parameter's state, as DTensors DCP can place."""
    mesh, mesh_dim = p.device_mesh, shard_mesh_dim(p)
    if _rows_sharded(p):
        local = widen_indices(_local_layout(p, geometry, window_size).to_rows(state))
        out = {"step": state["step"]}
        for key, value in local.items():
            if key == "step":
                continue
            row_dim = 1 if key.startswith("window") else 0
            shape = list(value.shape)
            shape[row_dim] = p.shape[0]
            placements = [Replicate()] * mesh.ndim
            placements[mesh_dim] = Shard(row_dim)
            out[key] = DTensor.from_local(
                value, mesh, placements, shape=torch.Size(shape), stride=torch.empty(shape, device="meta").stride()
            )
        return out
    # 1-D (or replicated): gather every rank's owned blocks, replicate the whole state
    full = dict(state)
    if mesh_dim is not None:
        pg = mesh.get_group(mesh_dim)
        for key, value in state.items():
            if key != "step":
                full[key] = _gather_cat(value, dim=1 if key.startswith("window") else 0, group=pg)
    rows = widen_indices(StateLayout(geometry, window_size).to_rows(full))
    return {
        key: value if key == "step" else DTensor.from_local(value, mesh, [Replicate()] * mesh.ndim, run_check=False)
        for key, value in rows.items()
    }


def import_state(p: DTensor, saved: dict, geometry: Geometry, window_size: int) -> dict:
    """Internal (flat, local) state of a DTensor parameter from its saved row form."""
    values = {}
    for key, value in narrow_indices(saved).items():
        if isinstance(value, DTensor):
            value = value.to_local() if _rows_sharded(p) else value.full_tensor()
        values[key] = value
    # this rank's rows (a sharded DTensor's local part), or cut out of the whole state
    return _local_layout(p, geometry, window_size).from_rows(values)


def _gather_cat(t: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Concatenate every rank's ``t`` along ``dim`` (sizes may differ) in rank order.

    Sent as raw bytes: gloo has no int16 all-gather.
    """
    world = dist.get_world_size(group)
    rows = t.movedim(dim, 0).contiguous()
    rest = rows.shape[1:]
    as_bytes = rows.reshape(rows.shape[0], math.prod(rest)).view(torch.uint8)
    sizes = [None] * world
    dist.all_gather_object(sizes, as_bytes.shape[0], group=group)
    padded = torch.cat([as_bytes, as_bytes.new_zeros(max(sizes) - as_bytes.shape[0], as_bytes.shape[1])])
    padded = padded.to(collective_device(group, t.device))  # CUDA for CPU-offloaded state under NCCL
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded, group=group)
    joined = torch.cat([o[:n] for o, n in zip(out, sizes)]).to(t.device).view(t.dtype)
    return joined.reshape(-1, *rest).movedim(0, dim)
