"""MicroAdam's layout inside a DeepSpeed ZeRO checkpoint: the schema the partition adapter writes
and the checkpoint reader reads (as DeepSpeed's own ``checkpoint/constants.py`` is shared).

A ZeRO optimizer hands MicroAdam flat fp32 *partitions*. Each holds *slices* of original
parameters: elements ``[start, start + numel)`` of parameter ``key`` at ``offset`` in the
partition. MicroAdam keeps one packed state per partition (``state.packed_shapes``: each slice's
owned blocks side by side, in the order of the slices' offsets), and adds to the optimizer state_dict, under
``LAYOUT_KEY``, which slices each partition holds and their parameter names, so the state can be
mapped back to parameters at any world size.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .geometry import geometry_of
from .state import StateLayout

#: the key of the layout description added to the optimizer state_dict of a ZeRO partition
LAYOUT_KEY = "microadam_zero_layout"
LAYOUT_VERSION = 1
#: one rank's optimizer file in a DeepSpeed checkpoint's tag directory
RANK_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")
#: the model-states file: one, or (ZeRO-3) one per rank
MODEL_STATES = "mp_rank_00_model_states.pt"
RANK_MODEL_STATES = "zero_pp_rank_{rank}_mp_rank_00_model_states.pt"


@dataclass(frozen=True)
class ZeroSlice:
    """Elements [start, start + numel) of parameter ``key`` sit at ``offset`` in the partition."""

    key: tuple[int, int]  # (DeepSpeed group index, index in that group), the same on every rank
    shape: tuple[int, ...]
    start: int
    numel: int
    offset: int

    def describe(self) -> tuple:
        return (self.key, self.shape, self.start, self.numel, self.offset)

    @classmethod
    def from_saved(cls, entry) -> ZeroSlice:
        key, shape, start, numel, offset = entry
        return cls(tuple(key), tuple(shape), int(start), int(numel), int(offset))

    def state_layout(self, group: dict) -> StateLayout:
        """The state this slice's partition keeps for it: its owned blocks."""
        geometry = geometry_of(self.shape, group)
        return StateLayout(geometry, group["window_size"], *geometry.owned_blocks(self.start, self.start + self.numel))


def describe_partition(rank: int, world: int, slices: list[ZeroSlice], names: list[str | None]) -> dict:
    """The entry of one partition in the layout MicroAdam saves (its slices under the on-disk key
    "pieces", the name checkpoints written before the rename carry)."""
    return {"rank": rank, "world_size": world, "pieces": [s.describe() for s in slices], "names": list(names)}


def saved_slices(info: dict) -> list[ZeroSlice]:
    return [ZeroSlice.from_saved(entry) for entry in info["pieces"]]


def same_partition(info: dict, rank: int, world: int, slices: list[ZeroSlice]) -> bool:
    """Whether a saved partition entry is exactly this rank's partition."""
    return info["world_size"] == world and info["rank"] == rank and saved_slices(info) == list(slices)
