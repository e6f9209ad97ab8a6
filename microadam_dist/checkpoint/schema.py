"""The JSON files checkpoints carry, read through schemas: self-sealed JSON, the canonical manifest
and the digest file.

Every field of a manifest or digest file is read through a schema (:func:`record` and friends)
that names what is missing or wrong, and unknown keys are refused, so a damaged key name is
reported, not skipped. A sealed file's last field holds the SHA-256 of its own text
(:func:`sealed_json`, :func:`check_seal`), so any changed byte is detected.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

from ..hyperparams import GEOMETRY_KEYS, HYPER_KEYS, validate_hyperparameters
from .base import CheckpointError

FORMAT = "microadam-canonical"
FORMAT_VERSION = 3  # 2: the manifest records its own SHA-256; 3: and the LR scheduler (versions 1 and 2 are read)
MANIFEST = "microadam-checkpoint.json"
MANIFEST_DIGEST = "manifest_sha256"

ZERO_DIGEST = "0" * 64
HEX64 = r"[0-9a-f]{64}"


# ---- self-protecting JSON ------------------------------------------------------------------------
def sealed_json(body: dict, key: str) -> str:
    """``body`` as JSON text whose last field ``key`` holds the SHA-256 of that same text with the
    field's value written as 64 zeros: any changed byte, the digest's own included, is detected."""
    text = json.dumps({**body, key: ZERO_DIGEST}, indent=1) + "\n"
    needle = f'"{key}": "{ZERO_DIGEST}"'
    assert text.count(needle) == 1
    return text.replace(needle, f'"{key}": "{hashlib.sha256(text.encode()).hexdigest()}"')


def no_duplicate_keys(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate keys {sorted({k for k in keys if keys.count(k) > 1})}")
    return dict(pairs)


def read_json(path: Path, what: str) -> tuple[dict, bytes]:
    """(object, raw bytes) of a JSON file that must hold an object; named errors otherwise."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path} cannot be read ({e.strerror or e}): the {what} is missing or unreadable") from e
    try:
        data = json.loads(raw, object_pairs_hook=no_duplicate_keys)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}): the {what} is corrupted") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a JSON {type(data).__name__}, not an object: the {what} is corrupted")
    return data, raw


def check_seal(path: Path, data: dict, raw: bytes, key: str, what: str) -> None:
    digest = data.get(key)
    if not isinstance(digest, str) or not re.fullmatch(HEX64, digest):
        raise CheckpointError(
            f"{path} has no valid {key!r} (the SHA-256 of itself, written last): the {what} is "
            "corrupted or was cut short"
        )
    needle = f'"{key}": "{digest}"'.encode()
    if (
        raw.count(needle) != 1
        or hashlib.sha256(raw.replace(needle, f'"{key}": "{ZERO_DIGEST}"'.encode())).hexdigest() != digest
    ):
        raise CheckpointError(
            f"{path} was changed after it was written (its SHA-256 differs from the {key} it "
            f"records): the {what} is corrupted"
        )


# ---- schemas: each a function (value, where) -> value that raises SchemaError --------------------------
class SchemaError(Exception):
    """A schema violation: where (a path into the document) and what is wrong."""


def integer(lo: int | None = None):
    def check(v, where):
        if isinstance(v, bool) or not isinstance(v, int):
            raise SchemaError(f"{where} is {v!r}, expected an integer")
        if lo is not None and v < lo:
            raise SchemaError(f"{where} is {v}, expected at least {lo}")
        return v

    return check


def number(v, where):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise SchemaError(f"{where} is {v!r}, expected a finite number")
    return v


def string(pattern: str | None = None):
    def check(v, where):
        if not isinstance(v, str) or (pattern is not None and not re.fullmatch(pattern, v)):
            raise SchemaError(f"{where} is {v!r}, expected a string" + (f" matching {pattern}" if pattern else ""))
        return v

    return check


def json_object(v, where):
    """Any JSON object (a scheduler's state_dict): its contents are the scheduler's to check."""
    if not isinstance(v, dict):
        raise SchemaError(f"{where} is {v!r}, expected an object")
    return v


def optional(spec):
    return lambda v, where: None if v is None else spec(v, where)


def list_of(spec, length: int | None = None):
    def check(v, where):
        if not isinstance(v, list) or (length is not None and len(v) != length):
            raise SchemaError(f"{where} is {v!r}, expected a list" + (f" of {length}" if length is not None else ""))
        return [spec(x, f"{where}[{i}]") for i, x in enumerate(v)]

    return check


def record(required: dict, allowed: dict | None = None):
    """An object with exactly these keys (``allowed`` ones may be absent); unknown keys are refused,
    so a damaged key name ("beTas") is reported, not skipped."""
    allowed = allowed or {}

    def check(v, where):
        if not isinstance(v, dict):
            raise SchemaError(f"{where} is {v!r}, expected an object")
        missing = [k for k in required if k not in v]
        if missing:
            raise SchemaError(f"{where} has no {missing[0]!r}")
        unknown = [k for k in v if k not in required and k not in allowed]
        if unknown:
            raise SchemaError(f"{where} has an unexpected key {unknown[0]!r}")
        return {k: (required.get(k) or allowed[k])(x, f"{where}.{k}") for k, x in v.items()}

    return check


def mapping(value_spec, key_pattern: str = r".+"):
    def check(v, where):
        if not isinstance(v, dict):
            raise SchemaError(f"{where} is {v!r}, expected an object")
        for k in v:
            if not re.fullmatch(key_pattern, k):
                raise SchemaError(f"{where} has a key {k!r} that is not a valid name ({key_pattern})")
        return {k: value_spec(x, f"{where}[{k!r}]") for k, x in v.items()}

    return check


def hyperparameters(v, where):
    """A parameter group: MicroAdam's hyperparameters, checked by the optimizer's own rules."""
    base = ("lr", "betas", "eps", "weight_decay", *GEOMETRY_KEYS)
    group = record(
        {
            "lr": number,
            "betas": list_of(number, 2),
            "eps": number,
            "weight_decay": number,
            "window_size": integer(1),
            "density": number,
            "block_size": integer(1),
            "quant_bucket_size": integer(1),
        },
        {k: number for k in (*HYPER_KEYS, "alpha") if k not in base},
    )(v, where)
    try:
        validate_hyperparameters(group)
    except (ValueError, KeyError) as e:
        raise SchemaError(f"{where}: {e}") from e
    return group


def relative_path(v, where):
    """A plain path inside the directory: no absolute path, no "." or ".." part."""
    parts = Path(string()(v, where)).parts
    if not parts or Path(v).is_absolute() or any(x in ("", ".", "..") for x in parts) or v != "/".join(parts):
        raise SchemaError(f"{where} has the file name {v!r}, which is not a plain path inside the directory")
    return v


def validated(path: Path, spec, value, what: str):
    """``spec(value)``, a violation reported as a CheckpointError naming ``path``."""
    try:
        return spec(value, what)
    except SchemaError as e:
        raise CheckpointError(f"{path}: {e}: the file is corrupted or was written by another tool") from e


# ---- the canonical manifest and the digest file --------------------------------------------------------
FILE_NAME = r"[A-Za-z0-9_][A-Za-z0-9_.-]*\.safetensors"  # a plain name inside the directory
MANIFEST_V1 = {
    "format": string(),
    "version": integer(),
    "created": optional(string()),
    "source": optional(record({"kind": string(), "path": string(), "world_size": optional(integer(1))})),
    "world_size": optional(integer(1)),
    "note": optional(string()),
    "step": optional(integer(0)),
    "param_groups": list_of(hyperparameters),
    "params": mapping(
        record(
            {
                "shape": list_of(integer(0)),
                "group": integer(0),
                "files": record({}, {"weight": string(FILE_NAME), "state": string(FILE_NAME)}),
            }
        )
    ),
    "files": mapping(record({"bytes": integer(0), "sha256": string(HEX64)}), FILE_NAME),
}
MANIFEST_V2 = {**MANIFEST_V1, MANIFEST_DIGEST: string(HEX64)}
MANIFEST_V3 = {**MANIFEST_V2, "lr_scheduler": optional(json_object)}
MANIFESTS = {1: MANIFEST_V1, 2: MANIFEST_V2, 3: MANIFEST_V3}

DIGESTS_SCHEMA = record(
    {
        "format": string(),
        "version": integer(),
        "files": mapping(record({"bytes": integer(0), "sha256": string(HEX64)})),
        "digests_sha256": string(HEX64),
    }
)
