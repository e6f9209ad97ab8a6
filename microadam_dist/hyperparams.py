"""MicroAdam's hyperparameters: their names, their allowed ranges, and when saved ones match.

Four of them shape the state (``GEOMETRY_KEYS``): state saved with other values cannot be loaded.
The others (``lr``, ``betas``, ``eps``, ``weight_decay``, ``alpha``) may change at any step.
"""

from __future__ import annotations

import math
from typing import Any

import torch

#: Fixed defaults, never derived from the device (docs/design.md, "Geometry").
DEFAULT_BLOCK_SIZE = 4096
DEFAULT_QUANT_BUCKET_SIZE = 2048
MAX_BLOCK_SIZE = 1 << 15  # block-local indices are int16
#: Hyperparameters that shape the state; a checkpoint made with other values cannot be loaded.
GEOMETRY_KEYS = ("window_size", "density", "block_size", "quant_bucket_size")
#: Every hyperparameter of a parameter group, as checkpoints record them.
HYPER_KEYS = ("lr", "betas", "eps", "weight_decay", "alpha", *GEOMETRY_KEYS)
#: What a checkpoint saved before a key existed means.
HYPER_DEFAULTS = {"alpha": 0.0}
DENSITY_REL_TOL = 1e-13  # float rounding only: far below any density a user would choose differently


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def validate_hyperparameters(group: dict[str, Any]) -> None:
    """Raise ValueError naming the first hyperparameter outside its allowed range."""
    lr = group["lr"]
    if isinstance(lr, torch.Tensor):
        raise ValueError("Invalid lr: a Tensor; lr must be a Python float")
    if not _is_number(lr) or not lr >= 0.0 or not math.isfinite(lr):
        raise ValueError(f"Invalid lr: {lr!r}; it must be a finite float >= 0")
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas!r}; it must be a pair (beta1, beta2)")
    for i, b in enumerate(betas):
        if not _is_number(b) or not 0.0 <= b < 1.0:
            raise ValueError(f"Invalid beta{i + 1}: {b!r}; it must be in [0, 1)")
    for key in ("eps", "weight_decay"):
        v = group[key]
        if not _is_number(v) or not v >= 0.0 or not math.isfinite(v):
            raise ValueError(f"Invalid {key}: {v!r}; it must be a finite float >= 0")
    m = group["window_size"]
    if not _is_int(m) or m < 1:
        raise ValueError(f"Invalid window_size: {m!r}; it must be an integer >= 1")
    d = group["density"]
    if not _is_number(d) or not 0.0 < d <= 1.0:
        raise ValueError(f"Invalid density: {d!r}; it must be in (0, 1]")
    alpha = group.get("alpha", 0.0)
    if not _is_number(alpha) or not 0.0 <= alpha < 1.0:
        raise ValueError(f"Invalid alpha: {alpha!r}; it must be in [0, 1) (0 turns densification off)")
    b = group["block_size"]
    if not _is_int(b) or not 1 <= b <= MAX_BLOCK_SIZE:
        raise ValueError(
            f"Invalid block_size: {b!r}; it must be an integer in [1, {MAX_BLOCK_SIZE}] "
            "(block-local indices are stored as int16)"
        )
    q = group["quant_bucket_size"]
    if not _is_int(q) or not 1 <= q <= b or b % q:
        raise ValueError(
            f"Invalid quant_bucket_size: {q!r}; it must be an integer that divides "
            f"block_size={b} (buckets tile each block)"
        )


def same_geometry_setting(key: str, saved, current) -> bool:
    """The one rule for whether a saved geometry setting matches an optimizer's: integers exactly;
    density up to float rounding (a density that went through JSON, a config file or another
    computation of the same decimal). Loaders check the state's shapes separately."""
    if key != "density":
        return saved == current
    if (
        isinstance(saved, bool)
        or isinstance(current, bool)
        or not all(isinstance(v, (int, float)) for v in (saved, current))
    ):
        return False
    return math.isclose(float(saved), float(current), rel_tol=DENSITY_REL_TOL, abs_tol=0.0)


def geometry_mismatch(saved: dict, current: dict) -> str | None:
    """The first geometry setting in which a saved param group differs from ``current`` (None: same)."""
    for key in GEOMETRY_KEYS:
        if not same_geometry_setting(key, saved.get(key), current[key]):
            return key
    return None


def check_same_geometry(saved_groups: list, groups: list[dict], error: type[Exception] = ValueError) -> None:
    """Refuse saved parameter groups whose number, or whose geometry settings, differ from ``groups``."""
    if len(saved_groups) != len(groups):
        raise error(f"the state_dict has {len(saved_groups)} parameter groups, this optimizer has {len(groups)}")
    for i, (saved, group) in enumerate(zip(saved_groups, groups)):
        absent = [key for key in GEOMETRY_KEYS if key not in saved]
        if absent:
            raise error(f"parameter group {i} of the state_dict has no {absent[0]!r}: it was not saved by MicroAdam")
        key = geometry_mismatch(saved, group)
        if key is not None:
            raise error(
                f"cannot load MicroAdam state saved with {key}={saved[key]!r} into an optimizer with "
                f"{key}={group[key]!r} (parameter group {i}); build the optimizer with "
                f"{key}={saved[key]!r} to resume this checkpoint"
            )
