"""MicroAdam checkpoints: the canonical form, and reading the engines' checkpoints into it.

The canonical form (docs/design.md, section 10) is world-size free: per parameter, keyed by its
fully qualified name, the fp32 weight and the optimizer state in row form. Readers
(:func:`open_checkpoint`) give the same per-parameter view (:class:`Checkpoint`) of three
sources, one parameter at a time so memory stays bounded: a canonical directory, a DCP checkpoint
of FSDP2, and a DeepSpeed ZeRO-1/2/3 checkpoint saved by MicroAdam at any world size. Writers:
:func:`write_canonical`, :func:`write_dcp` (loadable by FSDP2 at any world size) and
:func:`export_adam` (dense AdamW moments). Every writer builds its output in a temporary
directory beside the target and swaps it into place only when complete.

One module per concern:

    base            CheckpointError, ParamEntry, the Checkpoint view, check_compatible
    schema          self-sealed JSON; the manifest and digest-file schemas
    integrity       the seal of DCP and DeepSpeed directories (seal, digests), the formats' own checksums
    atomic          atomic_directory, swap_into_place, previous_of, last_complete
    safetensors_io  the streaming safetensors writer and reader
    canonical       CanonicalCheckpoint, write_canonical
    dcp             DCPCheckpoint, write_dcp
    deepspeed       DeepSpeedCheckpoint (the ZeRO checkpoint reader)
    adam_export     export_adam
    readers         open_checkpoint
    local           save and load of a single-process model and its MicroAdam
"""

from .adam_export import export_adam
from .atomic import atomic_directory, last_complete, previous_of, swap_into_place
from .base import (
    Checkpoint,
    CheckpointError,
    ParamEntry,
    apply_saved_hyperparameters,
    canonical_parameter,
    check_compatible,
    load_scheduler,
)
from .canonical import DEFAULT_SHARD_BYTES, CanonicalCheckpoint, write_canonical
from .dcp import DCPCheckpoint, write_dcp
from .deepspeed import DeepSpeedCheckpoint
from .integrity import DIGESTS, DIGESTS_FORMAT, TRAIN_META, seal, sha256_of
from .local import load, save
from .readers import open_checkpoint
from .safetensors_io import read_safetensors_header, read_safetensors_tensor
from .schema import FORMAT, FORMAT_VERSION, MANIFEST, MANIFEST_DIGEST

__all__ = [
    "DEFAULT_SHARD_BYTES",
    "DIGESTS",
    "DIGESTS_FORMAT",
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST",
    "MANIFEST_DIGEST",
    "TRAIN_META",
    "CanonicalCheckpoint",
    "Checkpoint",
    "CheckpointError",
    "DCPCheckpoint",
    "DeepSpeedCheckpoint",
    "ParamEntry",
    "apply_saved_hyperparameters",
    "atomic_directory",
    "canonical_parameter",
    "check_compatible",
    "export_adam",
    "last_complete",
    "load_scheduler",
    "load",
    "open_checkpoint",
    "previous_of",
    "read_safetensors_header",
    "read_safetensors_tensor",
    "save",
    "seal",
    "sha256_of",
    "swap_into_place",
    "write_canonical",
    "write_dcp",
]
