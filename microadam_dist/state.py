"""MicroAdam's per-parameter state: its fields, dtypes and shapes, and every form it takes.

The state of a range of blocks ``[b0, b1)`` of one parameter is five tensors:

    step        int64, 0-d, on the CPU (like torch's optimizers)   steps applied so far
    window_idx  int16  [window_size, K]   block-local indices of the kept entries, per ring slot
    window_val  bf16   [window_size, K]   their error-corrected gradient values
    ef_codes    uint8  [E]                packed 4-bit error feedback, two elements per byte
    ef_stats    fp32   [Q, 2]             (lo, hi) of every quantization bucket

with K, E and Q the sums over the blocks (``Geometry.state_sizes``). :class:`StateLayout` is that
value type: it builds, checks, slices, joins and installs such state. Three forms exist:

* the *flat* form above, what a step reads and writes (``opt.state[p]`` for a whole parameter, or a
  rank's owned blocks of a shard);
* the *row form* that checkpoints hold (``StateLayout.row_shapes``): the block dimension split into
  one entry per parameter row, ``window_* [m, rows, k_row]``, ``ef_codes [rows, e_row]``,
  ``ef_stats [rows, q_row, 2]``, so a checkpoint can be cut or joined at any row, like the
  parameter;
* the *packed* form of several layouts side by side (a DeepSpeed ZeRO partition holds slices of
  many parameters): each field concatenated, ``step`` a vector (:func:`packed_shapes`,
  :func:`packed_views`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .geometry import Geometry

FIELDS = ("step", "window_idx", "window_val", "ef_codes", "ef_stats")
DTYPES = {
    "step": torch.int64,
    "window_idx": torch.int16,
    "window_val": torch.bfloat16,
    "ef_codes": torch.uint8,
    "ef_stats": torch.float32,
}
#: fields whose block dimension is dim 1 (the ring slots come first); the others have it at dim 0
WINDOW_FIELDS = ("window_idx", "window_val")


@dataclass(frozen=True)
class StateLayout:
    """The state of blocks ``[b0, b1)`` (default: all) of a parameter of ``geometry``."""

    geometry: Geometry
    window_size: int
    b0: int = 0
    b1: int | None = None

    def __post_init__(self):
        if self.b1 is None:
            object.__setattr__(self, "b1", self.geometry.num_blocks)
        if not 0 <= self.b0 <= self.b1 <= self.geometry.num_blocks:
            raise ValueError(f"block range [{self.b0}, {self.b1}) outside [0, {self.geometry.num_blocks}]")

    # ---- sizes -----------------------------------------------------------------------------------
    @property
    def sizes(self) -> tuple[int, int, int]:
        """(window entries per slot, error-feedback bytes, buckets) of the range."""
        return self.geometry.state_sizes(self.b0, self.b1)

    @property
    def is_empty(self) -> bool:
        return self.b1 == self.b0

    @property
    def rows(self) -> int | None:
        """Parameter rows the range covers, when it is made of whole rows (else None)."""
        bpr = self.geometry.blocks_per_row
        if bpr == 0 or self.b0 % bpr or self.b1 % bpr:
            return None
        return (self.b1 - self.b0) // bpr

    def flat_shapes(self) -> dict[str, tuple]:
        k, e, q = self.sizes
        m = self.window_size
        return {"step": (), "window_idx": (m, k), "window_val": (m, k), "ef_codes": (e,), "ef_stats": (q, 2)}

    def row_shapes(self) -> dict[str, tuple]:
        """Shapes of the range in row form (it must cover whole rows)."""
        rows = self._whole_rows()
        (k_row, e_row, q_row), m = self.geometry.per_row, self.window_size
        return {
            "step": (),
            "window_idx": (m, rows, k_row),
            "window_val": (m, rows, k_row),
            "ef_codes": (rows, e_row),
            "ef_stats": (rows, q_row, 2),
        }

    def nbytes(self) -> int:
        return sum(_numel(shape) * DTYPES[key].itemsize for key, shape in self.flat_shapes().items())

    def _whole_rows(self) -> int:
        rows = self.rows
        if rows is None:
            raise ValueError(
                f"blocks [{self.b0}, {self.b1}) are not whole rows of a parameter of shape {self.geometry.shape}"
            )
        return rows

    # ---- building ----------------------------------------------------------------------------------
    def zeros(self, device) -> dict[str, torch.Tensor]:
        """Fresh state: an empty window and an error feedback of exactly 0."""
        return {
            key: torch.zeros(shape, dtype=DTYPES[key], device="cpu" if key == "step" else device)
            for key, shape in self.flat_shapes().items()
        }

    def install(self, flat: dict, device) -> dict[str, torch.Tensor]:
        """Own copies of flat state on ``device``, keeping the saved dtypes (``step`` on the CPU).

        torch's ``Optimizer.load_state_dict`` would cast floating-point state to the parameter's
        dtype (bf16 window values to fp32, fp32 statistics to bf16): state is installed here instead.
        """
        return {
            key: flat[key].detach().to("cpu" if key == "step" else device, copy=True).contiguous() for key in FIELDS
        }

    # ---- checking ----------------------------------------------------------------------------------
    def check(
        self,
        st,
        what: str,
        *,
        rows: bool = False,
        error: type[Exception] = ValueError,
        hint: str = "it was saved for another model, geometry or layout",
    ) -> None:
        """Raise ``error`` unless ``st`` holds exactly the five fields with their dtypes and this
        range's shapes (flat form, or row form with ``rows``); ``what`` names it in the message."""
        self.check_shapes(st, self.row_shapes() if rows else self.flat_shapes(), what, error=error, hint=hint)

    @staticmethod
    def check_shapes(
        st,
        shapes: dict,
        what: str,
        *,
        error: type[Exception] = ValueError,
        hint: str = "it was saved for another model, geometry or layout",
    ) -> None:
        """``check`` against explicit shapes (the packed form's, for instance)."""
        if not isinstance(st, dict) or set(st) != set(shapes):
            keys = sorted(st) if isinstance(st, dict) else type(st).__name__
            raise error(
                f"{what} has keys {keys}, expected MicroAdam's {sorted(shapes)}: is this another "
                "optimizer's checkpoint?"
            )
        for key, shape in shapes.items():
            value = st[key]
            if not isinstance(value, torch.Tensor):
                raise error(f"state {key!r} of {what} is a {type(value).__name__}, expected a tensor")
            if value.dtype != DTYPES[key] or tuple(value.shape) != tuple(shape):
                raise error(
                    f"state {key!r} of {what} is {value.dtype} {tuple(value.shape)}, expected "
                    f"{DTYPES[key]} {tuple(shape)}: {hint}"
                )

    def check_values(self, flat: dict, what: str, error: type[Exception] = ValueError) -> None:
        """The invariants of valid state: a non-negative step, window indices inside their blocks,
        ordered and finite bucket statistics."""
        if int(flat["step"]) < 0:
            raise error(f"{what} has a negative step count {int(flat['step'])}")
        idx = flat["window_idx"].long()
        if idx.numel() and (bool((idx < 0).any()) or bool((idx >= self.block_len_per_entry()).any())):
            raise error(f"{what} has window indices outside their blocks: the state is corrupted")
        lo, hi = flat["ef_stats"].unbind(-1)
        if bool((lo > hi).any()) or not bool(torch.isfinite(flat["ef_stats"]).all()):
            raise error(f"{what} has disordered or non-finite error-feedback statistics: the state is corrupted")

    def block_len_per_entry(self) -> torch.Tensor:
        """For each window entry of the flat form, the length of the block it indexes."""
        out = torch.empty(self.sizes[0], dtype=torch.long)
        for rect in self.geometry.rects(self.b0, self.b1):
            for r in range(rect.num_rows):
                start = rect.k_offset + r * rect.k_row_stride
                out[start : start + rect.num_cols * rect.k] = rect.block_len
        return out

    # ---- forms -------------------------------------------------------------------------------------
    def to_rows(self, flat: dict) -> dict[str, torch.Tensor]:
        """Views of flat state (of whole rows) in row form."""
        shapes = self.row_shapes()
        return {key: flat[key] if key == "step" else flat[key].view(shapes[key]) for key in FIELDS}

    def from_rows(self, values: dict) -> dict[str, torch.Tensor]:
        """Fresh flat state of this range from row form: ``values`` covers either exactly this range
        (as many rows) or the whole parameter, out of which the range is cut."""
        m = self.window_size
        flat = {
            key: values[key].reshape(m, -1)
            if key in WINDOW_FIELDS
            else values[key].reshape(-1, 2)
            if key == "ef_stats"
            else values[key].reshape(-1)
            for key in FIELDS
            if key != "step"
        }
        if flat["ef_codes"].numel() != self.sizes[1]:  # the whole parameter: take the range
            whole = StateLayout(self.geometry, m)
            if flat["ef_codes"].numel() != whole.sizes[1]:
                raise ValueError(
                    f"row-form state of {flat['ef_codes'].numel()} error-feedback bytes fits neither "
                    f"blocks [{self.b0}, {self.b1}) nor the whole parameter {self.geometry.shape}"
                )
            flat = self.cut(flat)
        out = {key: value.clone(memory_format=torch.contiguous_format) for key, value in flat.items()}
        out["step"] = values["step"].detach().to("cpu", torch.int64).clone()
        return out

    def cut(self, whole: dict) -> dict[str, torch.Tensor]:
        """Views of this range's blocks in the flat state of the whole parameter (``step`` omitted)."""
        (_, k0, e0, q0), (_, k1, e1, q1) = self.geometry.block_start(self.b0), self.geometry.block_start(self.b1)
        return {
            "window_idx": whole["window_idx"][:, k0:k1],
            "window_val": whole["window_val"][:, k0:k1],
            "ef_codes": whole["ef_codes"][e0:e1],
            "ef_stats": whole["ef_stats"][q0:q1],
        }

    @staticmethod
    def join(geometry: Geometry, window_size: int, parts: list[tuple[int, int, dict]]) -> dict[str, torch.Tensor]:
        """A whole parameter's state in row form from ``(b0, b1, flat state of blocks [b0, b1))``
        parts, in any order (as its ranks own them); ValueError if some block is in no part."""
        parts = sorted((p for p in parts if p[1] > p[0]), key=lambda p: p[0])
        pos = 0
        for b0, b1, _ in parts:
            if b0 != pos:
                break
            pos = b1
        if pos != geometry.num_blocks or not parts:
            raise ValueError(f"blocks from {pos} are held by no rank")
        flat = {
            key: torch.cat([p[2][key] for p in parts], dim=1 if key in WINDOW_FIELDS else 0)
            for key in FIELDS
            if key != "step"
        }
        flat["step"] = parts[0][2]["step"].clone()
        return StateLayout(geometry, window_size).to_rows(flat)


# ---- window indices in collectives ------------------------------------------------------------------
#: the dtype window indices are exported in where a collective may move them (FSDP2 state dicts): full
#: state dicts all-gather, scatter and broadcast every DTensor, and neither gloo nor NCCL has int16
#: collectives. Loading narrows them back, so state saved with int16 indices loads as well.
EXPORT_INDEX_DTYPE = torch.int32


def widen_indices(st: dict) -> dict:
    return {**st, "window_idx": st["window_idx"].to(EXPORT_INDEX_DTYPE)}


def narrow_indices(st) -> dict:
    """Saved state with exported (int32) window indices narrowed to the state's int16 (elementwise:
    no collective, also for DTensors); ValueError when a value does not fit (damaged state)."""
    idx = st.get("window_idx") if isinstance(st, dict) else None
    if isinstance(idx, torch.Tensor) and idx.dtype == EXPORT_INDEX_DTYPE:
        local = idx.to_local() if hasattr(idx, "to_local") else idx
        info = torch.iinfo(DTYPES["window_idx"])
        if local.numel() and (int(local.min()) < info.min or int(local.max()) > info.max):
            raise ValueError(
                f"window indices out of the int16 range ({int(local.min())}..{int(local.max())}): "
                "the saved state is damaged"
            )
        return {**st, "window_idx": idx.to(DTYPES["window_idx"])}
    return st


# ---- several layouts packed side by side (a DeepSpeed ZeRO partition) ----------------------------------
def packed_shapes(layouts: list[StateLayout]) -> dict[str, tuple]:
    """Shapes of the packed state of ``layouts`` (same window size): fields concatenated, one step each."""
    m = layouts[0].window_size if layouts else 0
    k, e, q = (sum(layout.sizes[i] for layout in layouts) for i in range(3))
    return {"step": (len(layouts),), "window_idx": (m, k), "window_val": (m, k), "ef_codes": (e,), "ef_stats": (q, 2)}


def packed_zeros(layouts: list[StateLayout], device) -> dict[str, torch.Tensor]:
    return {
        key: torch.zeros(shape, dtype=DTYPES[key], device="cpu" if key == "step" else device)
        for key, shape in packed_shapes(layouts).items()
    }


def packed_views(layouts: list[StateLayout], packed: dict) -> list[dict[str, torch.Tensor]]:
    """Each layout's flat state as views into the packed state (``step`` a 0-d view)."""
    views, k0, e0, q0 = [], 0, 0, 0
    for j, layout in enumerate(layouts):
        k, e, q = layout.sizes
        views.append(
            {
                "step": packed["step"][j],
                "window_idx": packed["window_idx"][:, k0 : k0 + k],
                "window_val": packed["window_val"][:, k0 : k0 + k],
                "ef_codes": packed["ef_codes"][e0 : e0 + e],
                "ef_stats": packed["ef_stats"][q0 : q0 + q],
            }
        )
        k0, e0, q0 = k0 + k, e0 + e, q0 + q
    return views


def state_nbytes(state) -> int:
    """Exact bytes of the tensors in a (nested) state dict; DTensors count their local shard."""
    if isinstance(state, torch.Tensor):
        local = state.to_local() if hasattr(state, "to_local") else state
        return local.numel() * local.element_size()
    return sum(map(state_nbytes, state.values())) if isinstance(state, dict) else 0


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


__all__ = [
    "DTYPES",
    "EXPORT_INDEX_DTYPE",
    "FIELDS",
    "StateLayout",
    "packed_shapes",
    "packed_views",
    "packed_zeros",
    "narrow_indices",
    "state_nbytes",
    "widen_indices",
]
