"""Opening a checkpoint: the format detected from its files."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from ..zero_layout import RANK_FILE
from .atomic import previous_of
from .base import Checkpoint, CheckpointError
from .canonical import CanonicalCheckpoint
from .dcp import DCPCheckpoint
from .deepspeed import DeepSpeedCheckpoint
from .schema import MANIFEST


def open_checkpoint(path) -> Checkpoint:
    """Open a canonical, DCP or DeepSpeed checkpoint (detected from its files)."""
    path = Path(path)
    if not path.exists() and previous_of(path).is_dir():
        warnings.warn(
            f"{path} is missing: an overwrite was interrupted while swapping it in; reading the previous "
            f"checkpoint, kept at {previous_of(path)}",
            stacklevel=2,
        )
        path = previous_of(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if path.is_file():
        raise CheckpointError(f"{path} is a file; a checkpoint is a directory (canonical, DCP or DeepSpeed)")
    if path.name.endswith(".partial"):  # the writers' temporary names (tool and main job)
        raise CheckpointError(
            f"{path} is an incomplete checkpoint (a write was interrupted before it was renamed "
            "into place): use the previous one"
        )
    if (path / MANIFEST).exists():
        return CanonicalCheckpoint(path)
    if (path / ".metadata").exists():
        return DCPCheckpoint(path)
    if (path / "latest").exists() or any(RANK_FILE.match(f) for f in os.listdir(path)):
        return DeepSpeedCheckpoint(path)
    if any(path.glob("*.safetensors")):
        raise CheckpointError(
            f"{path} has safetensors files but no {MANIFEST}: an interrupted or foreign write; "
            "the manifest is written last, so this checkpoint is incomplete"
        )
    raise CheckpointError(
        f"{path} is not a checkpoint this tool knows: expected a canonical directory "
        f"({MANIFEST}), a DCP checkpoint (.metadata) or a DeepSpeed checkpoint (latest, "
        "zero_pp_rank_*_optim_states.pt)"
    )
