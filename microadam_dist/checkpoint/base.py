"""What every checkpoint format shares: its error, the per-parameter view readers give
(:class:`Checkpoint`), and the checks of a checkpoint against a model.

A reader lists the parameters (name, shape, parameter group) and the groups' hyperparameters up
front, then gives one parameter's fp32 weight and row-form state (``state.StateLayout``) at a
time, so memory stays bounded by the largest parameter.
"""

from __future__ import annotations

import abc
import contextlib
import json
import pickle
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..geometry import Geometry, geometry_of
from ..hyperparams import geometry_mismatch
from ..state import StateLayout

#: why a state of the wrong dtype or shape does not fit
FOREIGN_STATE = (
    "the checkpoint belongs to another model or MicroAdam geometry (window_size, density, block_size, "
    "quant_bucket_size)"
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit: the message names the problem and the fix."""


@contextlib.contextmanager
def damaged(where, what: str = "the checkpoint is damaged, truncated or not one this tool knows"):
    """Turn what reading a damaged pickle-based file (DCP, DeepSpeed) raises into a named error:
    their unpickled contents can be anything, so every access may fail in any of these ways."""
    try:
        yield
    except CheckpointError:
        raise
    except (
        KeyError,
        IndexError,
        TypeError,
        ValueError,
        AttributeError,
        RuntimeError,
        OSError,
        EOFError,
        OverflowError,
        MemoryError,
        pickle.UnpicklingError,
        zipfile.BadZipFile,
    ) as e:
        raise CheckpointError(f"{where}: {what} ({type(e).__name__}: {e})") from e


@dataclass
class ParamEntry:
    name: str
    shape: tuple[int, ...]
    group: int  # index into Checkpoint.groups


class Checkpoint(abc.ABC):
    """One parameter at a time view of a checkpoint (subclasses read each source)."""

    kind = "?"

    def __init__(self, path: Path):
        self.path = Path(path)
        self.world_size: int | None = None
        self.step: int | None = None  # the training step, when the source records one
        #: the LR scheduler's state_dict, when the source records one (so a resume continues the schedule)
        self.lr_scheduler: dict | None = None
        self.groups: list[dict[str, Any]] = []  # hyperparameters (HYPER_KEYS) per parameter group
        self.params: dict[str, ParamEntry] = {}

    @abc.abstractmethod
    def weight(self, name: str) -> torch.Tensor | None:
        """The fp32 weight of ``name`` in its shape, or None when the source holds none."""

    @abc.abstractmethod
    def state(self, name: str) -> dict[str, torch.Tensor] | None:
        """The optimizer state of ``name`` in row form, or None before its first step."""

    def verify(self) -> list[str]:
        """Deep integrity check (digests, where the checkpoint has them, else the format's own
        checksums); the problems found."""
        return []

    def unverified(self) -> list[str]:
        """What no digest covers (empty: ``verify`` checks every byte of every file)."""
        return []

    def has_weights(self) -> bool:
        """Whether the source holds the parameters' weights (all or none)."""
        return True

    def has_state(self, name: str) -> bool:
        """Whether ``name`` has optimizer state (false before its first step); cheap, no data read."""
        return self.state(name) is not None

    # -- shared helpers ---------------------------------------------------------------------------
    def geometry(self, name: str) -> Geometry:
        entry = self.params[name]
        return geometry_of(entry.shape, self.groups[entry.group])

    def layout(self, name: str) -> StateLayout:
        """The state of the whole parameter ``name``."""
        return StateLayout(self.geometry(name), self.groups[self.params[name].group]["window_size"])

    def checked_state(self, name: str) -> dict[str, torch.Tensor] | None:
        """``state(name)`` with dtypes, shapes and the invariants checked (indices inside their
        blocks, bucket statistics ordered, a non-negative step)."""
        st = self.state(name)
        if st is None:
            return None
        layout, what = self.layout(name), f"parameter {name!r} in {self.path}"
        layout.check(st, what, rows=True, error=CheckpointError, hint=FOREIGN_STATE)
        layout.check_values(layout.from_rows(st), what, error=CheckpointError)
        return st

    def state_bytes(self) -> int:
        return sum(self.layout(name).nbytes() for name in self.params)

    def close(self) -> None:
        pass


def checked_weight(ckpt: Checkpoint, name: str) -> torch.Tensor | None:
    """``ckpt.weight(name)`` in fp32, its shape checked against the parameter's."""
    weight = ckpt.weight(name)
    if weight is not None:
        entry = ckpt.params[name]
        if tuple(weight.shape) != entry.shape:
            raise CheckpointError(f"{ckpt.path}: weight of {name!r} is {tuple(weight.shape)}, expected {entry.shape}")
        weight = weight.to(torch.float32)
    return weight


def canonical_parameter(ckpt: Checkpoint, name: str) -> tuple[torch.Tensor | None, dict | None]:
    """The weight and checked state of one parameter."""
    return checked_weight(ckpt, name), ckpt.checked_state(name)


def check_compatible(ckpt: Checkpoint, shapes: dict[str, tuple], groups: dict[str, dict]) -> None:
    """Raise CheckpointError naming every missing, extra or reshaped parameter, or a geometry mismatch."""
    missing = [n for n in shapes if n not in ckpt.params]
    extra = [n for n in ckpt.params if n not in shapes]
    reshaped = [
        f"{n} {ckpt.params[n].shape} -> {shapes[n]}"
        for n in shapes
        if n in ckpt.params and ckpt.params[n].shape != tuple(shapes[n])
    ]
    problems = []
    if missing:
        problems.append(f"missing from the checkpoint: {missing}")
    if extra:
        problems.append(f"in the checkpoint but not in the model: {extra}")
    if reshaped:
        problems.append(f"reshaped (checkpoint -> model): {reshaped}")
    if problems:
        raise CheckpointError(f"{ckpt.path} was saved from another model; " + "; ".join(problems))
    for name, group in groups.items():
        saved = ckpt.groups[ckpt.params[name].group]
        key = geometry_mismatch(saved, group)
        if key is not None:
            raise CheckpointError(
                f"{ckpt.path}: parameter {name!r} was saved with {key}={saved[key]!r}, this "
                f"optimizer has {key}={group[key]!r}; use the same MicroAdam geometry"
            )


def scheduler_json(ckpt: Checkpoint) -> dict | None:
    """``ckpt.lr_scheduler`` as the JSON object a manifest records, or None (with a warning naming
    what is lost) when it holds something JSON cannot carry."""
    state = ckpt.lr_scheduler
    if state is None:
        return None
    try:
        return json.loads(json.dumps(state))
    except (TypeError, ValueError) as e:
        warnings.warn(
            f"{ckpt.path}: the LR scheduler's state ({type(e).__name__}: {e}) cannot be written as JSON; "
            "the converted checkpoint records none, so a resume from it starts the schedule afresh",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


def apply_saved_hyperparameters(groups: list[dict], saved_groups: list[dict]) -> None:
    """Set the saved lr, betas, eps, weight_decay and alpha on the optimizer's param groups, as
    ``Optimizer.load_state_dict`` does: schedulers set them, and the first resumed step uses them."""
    for group, saved in zip(groups, saved_groups):
        group.update(
            {
                k: (tuple(v) if k == "betas" else v)
                for k, v in saved.items()
                if k in ("lr", "betas", "eps", "weight_decay", "alpha") and v is not None
            }
        )


def load_scheduler(ckpt: Checkpoint, lr_scheduler) -> None:
    """Continue ``lr_scheduler`` (anything with ``load_state_dict``; None: nothing to do) from the
    state ``ckpt`` records; warn when it records none."""
    if lr_scheduler is None:
        return
    if ckpt.lr_scheduler is None:
        warnings.warn(
            f"{ckpt.path} records no LR scheduler state: the scheduler starts from its beginning "
            "(its step count and learning rate are not those of the saved run)",
            RuntimeWarning,
            stacklevel=3,
        )
        return
    lr_scheduler.load_state_dict(ckpt.lr_scheduler)


def progress_bar(iterable, total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="param", disable=not enabled or None, leave=False)
