"""MicroAdam checkpoints: the canonical form, and reading the engines' checkpoints into it.

The canonical form (docs/design.md, section 10) is world-size free: per parameter, keyed by its
fully qualified name, the fp32 weight and the optimizer state in row form
(``functional.canonical_shapes``). On disk it is a directory:

    microadam-checkpoint.json   manifest: format, version, step, hyperparameters, parameters,
                                the size and SHA-256 of every data file, and last the SHA-256
                                of the manifest itself (written last)
    weights-00001.safetensors   "<name>": fp32 weights
    state-00001.safetensors     "<name>/step|window_idx|window_val|ef_codes|ef_stats"

Readers (:func:`open_checkpoint`) give the same per-parameter view of three sources, one
parameter at a time so memory stays bounded: a canonical directory, a DCP checkpoint of FSDP2
(``microadam_dist.train``'s layout: ``model.<name>``, ``optim.state.<name>.<field>``), and a
DeepSpeed ZeRO-1/2/3 checkpoint saved by MicroAdam at any world size (each rank's partition
state and fp32 master partition, mapped back through the layout MicroAdam saves beside them).
Writers: :func:`write_canonical`, :func:`write_dcp` (loadable by FSDP2 at any world size) and
:func:`export_adam` (dense AdamW moments). Every writer builds its output in a temporary
directory beside the target and renames it into place only when complete.

Integrity: every field of a manifest is read through a schema (:func:`_record` and friends) that
names what is missing or wrong; a version-2 manifest carries the SHA-256 of its own text, so any
changed byte is detected. A DCP or DeepSpeed directory written by this package (``write_dcp``,
``microadam_dist.train``) is sealed with ``microadam-digests.json`` (:func:`seal`): the size and
SHA-256 of every file, protected the same way. Checkpoints without digests (version-1 manifests,
DCP or DeepSpeed written by other code) are read and checked as far as their format allows, and
``Checkpoint.unverified`` says what no digest covers.
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import io
import json
import math
import os
import pickle
import re
import shutil
import zipfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from .functional import (STATE_DTYPES, StepConfig, canonical_shapes, dense_moments, from_row_form,
                         join_owned_blocks, to_row_form)
from .geometry import Geometry, geometry_for, same_geometry_setting

FORMAT = "microadam-canonical"
FORMAT_VERSION = 2  # 2: the manifest records its own SHA-256 (version 1, without it, is still read)
MANIFEST = "microadam-checkpoint.json"
MANIFEST_DIGEST = "manifest_sha256"
DIGESTS = "microadam-digests.json"  # the seal of a DCP or DeepSpeed directory written by this package
DIGESTS_FORMAT = "microadam-digests"
FIELDS = ("step", "window_idx", "window_val", "ef_codes", "ef_stats")
GEOMETRY_KEYS = ("window_size", "density", "block_size", "quant_bucket_size")
HYPER_KEYS = ("lr", "betas", "eps", "weight_decay", "alpha", *GEOMETRY_KEYS)
HYPER_DEFAULTS = {"alpha": 0.0}  # what a checkpoint saved before the key existed means
DEFAULT_SHARD_BYTES = 1 << 30


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit: the message names the problem and the fix."""


@contextlib.contextmanager
def _damaged(where, what: str = "the checkpoint is damaged, truncated or not one this tool knows"):
    """Turn what reading a damaged pickle-based file (DCP, DeepSpeed) raises into a named error:
    their unpickled contents can be anything, so every access may fail in any of these ways."""
    try:
        yield
    except CheckpointError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, RuntimeError, OSError, EOFError,
            OverflowError, MemoryError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{where}: {what} ({type(e).__name__}: {e})") from e


# ---- self-protecting JSON and the manifest's schema -----------------------------------------------
_ZERO_DIGEST = "0" * 64
_HEX64 = r"[0-9a-f]{64}"


def _sealed_json(body: dict, key: str) -> str:
    """``body`` as JSON text whose last field ``key`` holds the SHA-256 of that same text with the
    field's value written as 64 zeros: any changed byte, the digest's own included, is detected."""
    text = json.dumps({**body, key: _ZERO_DIGEST}, indent=1) + "\n"
    needle = f'"{key}": "{_ZERO_DIGEST}"'
    assert text.count(needle) == 1
    return text.replace(needle, f'"{key}": "{hashlib.sha256(text.encode()).hexdigest()}"')


def _no_duplicate_keys(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate keys {sorted({k for k in keys if keys.count(k) > 1})}")
    return dict(pairs)


def _read_json(path: Path, what: str) -> tuple[dict, bytes]:
    """(object, raw bytes) of a JSON file that must hold an object; named errors otherwise."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path} cannot be read ({e.strerror or e}): the {what} is missing or unreadable") from e
    try:
        data = json.loads(raw, object_pairs_hook=_no_duplicate_keys)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}): the {what} is corrupted") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a JSON {type(data).__name__}, not an object: the {what} is corrupted")
    return data, raw


def _check_seal(path: Path, data: dict, raw: bytes, key: str, what: str) -> None:
    digest = data.get(key)
    if not isinstance(digest, str) or not re.fullmatch(_HEX64, digest):
        raise CheckpointError(f"{path} has no valid {key!r} (the SHA-256 of itself, written last): the {what} is "
                              "corrupted or was cut short")
    needle = f'"{key}": "{digest}"'.encode()
    if raw.count(needle) != 1 or \
            hashlib.sha256(raw.replace(needle, f'"{key}": "{_ZERO_DIGEST}"'.encode())).hexdigest() != digest:
        raise CheckpointError(f"{path} was changed after it was written (its SHA-256 differs from the {key} it "
                              f"records): the {what} is corrupted")


class _Bad(Exception):
    """A schema violation: where (a path into the document) and what is wrong."""


def _integer(lo: int | None = None):
    def check(v, where):
        if isinstance(v, bool) or not isinstance(v, int):
            raise _Bad(f"{where} is {v!r}, expected an integer")
        if lo is not None and v < lo:
            raise _Bad(f"{where} is {v}, expected at least {lo}")
        return v
    return check


def _number(v, where):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise _Bad(f"{where} is {v!r}, expected a finite number")
    return v


def _string(pattern: str | None = None):
    def check(v, where):
        if not isinstance(v, str) or (pattern is not None and not re.fullmatch(pattern, v)):
            raise _Bad(f"{where} is {v!r}, expected a string" + (f" matching {pattern}" if pattern else ""))
        return v
    return check


def _optional(spec):
    return lambda v, where: None if v is None else spec(v, where)


def _list_of(spec, length: int | None = None):
    def check(v, where):
        if not isinstance(v, list) or (length is not None and len(v) != length):
            raise _Bad(f"{where} is {v!r}, expected a list" + (f" of {length}" if length is not None else ""))
        return [spec(x, f"{where}[{i}]") for i, x in enumerate(v)]
    return check


def _record(required: dict, optional: dict | None = None):
    """An object with exactly these keys (``optional`` ones may be absent); unknown keys are refused,
    so a damaged key name ("beTas") is reported, not skipped."""
    optional = optional or {}

    def check(v, where):
        if not isinstance(v, dict):
            raise _Bad(f"{where} is {v!r}, expected an object")
        missing = [k for k in required if k not in v]
        if missing:
            raise _Bad(f"{where} has no {missing[0]!r}")
        unknown = [k for k in v if k not in required and k not in optional]
        if unknown:
            raise _Bad(f"{where} has an unexpected key {unknown[0]!r}")
        return {k: (required.get(k) or optional[k])(x, f"{where}.{k}") for k, x in v.items()}
    return check


def _mapping(value_spec, key_pattern: str = r".+"):
    def check(v, where):
        if not isinstance(v, dict):
            raise _Bad(f"{where} is {v!r}, expected an object")
        for k in v:
            if not re.fullmatch(key_pattern, k):
                raise _Bad(f"{where} has a key {k!r} that is not a valid name ({key_pattern})")
        return {k: value_spec(x, f"{where}[{k!r}]") for k, x in v.items()}
    return check


def _hyperparameters(v, where):
    """A parameter group: MicroAdam's hyperparameters, checked by the optimizer's own rules."""
    from .optimizer import validate_hyperparameters

    base = ("lr", "betas", "eps", "weight_decay", *GEOMETRY_KEYS)
    group = _record({"lr": _number, "betas": _list_of(_number, 2), "eps": _number, "weight_decay": _number,
                     "window_size": _integer(1), "density": _number, "block_size": _integer(1),
                     "quant_bucket_size": _integer(1)},
                    {k: _number for k in (*HYPER_KEYS, "alpha") if k not in base})(v, where)
    try:
        validate_hyperparameters(group)
    except (ValueError, KeyError) as e:
        raise _Bad(f"{where}: {e}") from e
    return group


_FILE_NAME = r"[A-Za-z0-9_][A-Za-z0-9_.-]*\.safetensors"  # a plain name inside the directory
_MANIFEST_V1 = {
    "format": _string(), "version": _integer(), "created": _optional(_string()),
    "source": _optional(_record({"kind": _string(), "path": _string(), "world_size": _optional(_integer(1))})),
    "world_size": _optional(_integer(1)), "note": _optional(_string()), "step": _optional(_integer(0)),
    "param_groups": _list_of(_hyperparameters),
    "params": _mapping(_record({"shape": _list_of(_integer(0)), "group": _integer(0),
                                "files": _record({}, {"weight": _string(_FILE_NAME), "state": _string(_FILE_NAME)})})),
    "files": _mapping(_record({"bytes": _integer(0), "sha256": _string(_HEX64)}), _FILE_NAME),
}
_MANIFEST_V2 = {**_MANIFEST_V1, MANIFEST_DIGEST: _string(_HEX64)}


def _validated(path: Path, spec, value, what: str):
    try:
        return spec(value, what)
    except _Bad as e:
        raise CheckpointError(f"{path}: {e}: the file is corrupted or was written by another tool") from e


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
        entry, group = self.params[name], self.groups[self.params[name].group]
        return geometry_for(entry.shape, group["block_size"], group["quant_bucket_size"], float(group["density"]))

    def checked_state(self, name: str) -> dict[str, torch.Tensor] | None:
        """``state(name)`` with dtypes, shapes and the invariants checked (indices inside their
        blocks, bucket statistics ordered, a non-negative step)."""
        st = self.state(name)
        if st is None:
            return None
        geom = self.geometry(name)
        check_state(name, st, geom, self.groups[self.params[name].group]["window_size"], where=str(self.path))
        return st

    def state_bytes(self) -> int:
        total = 0
        for name in self.params:
            group = self.groups[self.params[name].group]
            for key, shape in canonical_shapes(self.geometry(name), group["window_size"]).items():
                total += math.prod(shape) * STATE_DTYPES[key].itemsize
        return total

    def close(self) -> None:
        pass


def check_state(name: str, st: dict, geom: Geometry, window_size: int, where: str) -> None:
    expected = canonical_shapes(geom, window_size)
    for key, shape in expected.items():
        value = st.get(key)
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{where}: parameter {name!r} has no state {key!r}: the checkpoint is incomplete "
                                  "or was written by another optimizer")
        if value.dtype != STATE_DTYPES[key] or tuple(value.shape) != tuple(shape):
            raise CheckpointError(
                f"{where}: state {key!r} of parameter {name!r} is {value.dtype} {tuple(value.shape)}, expected "
                f"{STATE_DTYPES[key]} {tuple(shape)}: the checkpoint belongs to another model or MicroAdam "
                "geometry (window_size, density, block_size, quant_bucket_size)")
    if int(st["step"]) < 0:
        raise CheckpointError(f"{where}: parameter {name!r} has a negative step count {int(st['step'])}")
    flat = from_row_form(st, geom, window_size)
    limits = _block_lengths_per_entry(geom)
    idx = flat["window_idx"].long()
    if idx.numel() and (bool((idx < 0).any()) or bool((idx >= limits).any())):
        raise CheckpointError(f"{where}: parameter {name!r} has window indices outside their blocks: the "
                              "state is corrupted")
    lo, hi = flat["ef_stats"].unbind(-1)
    if bool((lo > hi).any()) or not bool(torch.isfinite(flat["ef_stats"]).all()):
        raise CheckpointError(f"{where}: parameter {name!r} has disordered or non-finite error-feedback "
                              "statistics: the state is corrupted")


def _block_lengths_per_entry(geom: Geometry) -> torch.Tensor:
    """For each window entry of the flat layout, the length of the block it indexes."""
    out = torch.empty(geom.state_sizes(0, geom.num_blocks)[0], dtype=torch.long)
    for p in geom.pieces(0, geom.num_blocks):
        for r in range(p.num_rows):
            start = p.k_offset + r * p.k_row_stride
            out[start:start + p.num_cols * p.k] = p.block_len
    return out


# ---- canonical directories ----------------------------------------------------------------------
class CanonicalCheckpoint(Checkpoint):
    kind = "canonical"

    def __init__(self, path: Path):
        super().__init__(path)
        manifest_path = self.path / MANIFEST
        manifest, raw = _read_json(manifest_path, "manifest")
        if manifest.get("format") != FORMAT:
            raise CheckpointError(f"{manifest_path} is not a MicroAdam canonical manifest (format "
                                  f"{manifest.get('format')!r})")
        version = manifest.get("version")
        if version not in (1, FORMAT_VERSION):
            raise CheckpointError(f"{manifest_path}: format version {version!r} is not supported by this "
                                  f"microadam_dist (versions 1 and {FORMAT_VERSION}); upgrade microadam_dist")
        self.sealed = version >= 2  # version 1 manifests carry no digest of themselves
        if self.sealed:  # before the schema: a damaged manifest is reported as damaged, whatever changed
            _check_seal(manifest_path, manifest, raw, MANIFEST_DIGEST, "manifest")
        manifest = _validated(manifest_path, _record(_MANIFEST_V2 if self.sealed else _MANIFEST_V1), manifest,
                              "manifest")
        self.manifest = manifest
        self.step = manifest["step"]
        self.world_size = manifest["world_size"]
        self.groups = [{**HYPER_DEFAULTS, **{k: (tuple(v) if k == "betas" else v) for k, v in g.items()}}
                       for g in manifest["param_groups"]]  # keys added since a manifest was written: defaults
        self.params = {}
        for name, p in manifest["params"].items():
            if p["group"] >= len(self.groups):
                raise CheckpointError(f"{manifest_path}: parameter {name!r} is in group {p['group']}, the manifest "
                                      f"has {len(self.groups)} groups: the manifest is corrupted")
            for part, fname in p["files"].items():
                if fname not in manifest["files"]:
                    raise CheckpointError(f"{manifest_path}: the {part} of parameter {name!r} is in {fname}, which "
                                          "the manifest does not list: the manifest is corrupted")
            self.params[name] = ParamEntry(name, tuple(p["shape"]), p["group"])
        for fname, info in manifest["files"].items():
            fpath = self.path / fname
            try:
                size = fpath.stat().st_size
            except FileNotFoundError:
                raise CheckpointError(f"{fpath} is missing: the checkpoint is incomplete") from None
            if size != info["bytes"]:
                raise CheckpointError(f"{fpath} has {size} bytes, the manifest says {info['bytes']}: the file is "
                                      "truncated or was replaced")
        self._handles: dict[str, Any] = {}
        self._where = {name: p["files"] for name, p in manifest["params"].items()}

    def _get(self, fname: str, key: str) -> torch.Tensor:
        if fname not in self._handles:
            self._handles[fname] = read_safetensors_header(self.path / fname)
        return read_safetensors_tensor(self.path / fname, self._handles[fname], key)

    def has_weights(self):
        return all("weight" in files for files in self._where.values())

    def has_state(self, name):
        return "state" in self._where[name]

    def weight(self, name):
        fname = self._where[name].get("weight")
        if fname is None:
            return None
        weight = self._get(fname, name)
        if weight.dtype != torch.float32:
            raise CheckpointError(f"{self.path / fname}: weight {name!r} is {weight.dtype}, canonical weights are "
                                  "torch.float32: the file is corrupted or was written by another tool")
        return weight

    def state(self, name):
        fname = self._where[name].get("state")
        if fname is None:
            return None
        return {key: self._get(fname, f"{name}/{key}") for key in FIELDS}

    def verify(self) -> list[str]:
        problems = []
        for fname, info in self.manifest["files"].items():
            try:
                if sha256_of(self.path / fname) != info["sha256"]:
                    problems.append(f"{self.path / fname}: SHA-256 differs from the manifest (corrupted)")
            except OSError as e:
                problems.append(f"{self.path / fname} cannot be read ({e})")
        return problems

    def unverified(self) -> list[str]:
        if self.sealed:
            return []
        return [f"{self.path / MANIFEST}: unverified manifest (format version 1 records no digest of itself, so a "
                "changed hyperparameter or name in it cannot be detected; the data files' digests are checked). "
                "Rewrite it with `microadam-ckpt convert DIR NEW --to single` to add one"]

    def close(self):
        self._handles.clear()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---- the seal of DCP and DeepSpeed directories ------------------------------------------------------
TRAIN_META = "train_meta.json"
_SMALL_FILE = 1 << 20  # files checked against their digest on every open (.metadata, latest, train_meta.json)


def _relative_path(v, where):
    parts = Path(_string()(v, where)).parts
    if not parts or Path(v).is_absolute() or any(x in ("", ".", "..") for x in parts) or v != "/".join(parts):
        raise _Bad(f"{where} has the file name {v!r}, which is not a plain path inside the directory")
    return v


_DIGESTS_SCHEMA = _record({"format": _string(), "version": _integer(),
                           "files": _mapping(_record({"bytes": _integer(0), "sha256": _string(_HEX64)})),
                           "digests_sha256": _string(_HEX64)})


def seal(directory, meta: dict | None = None) -> Path:
    """Seal a DCP or DeepSpeed directory this package wrote: ``train_meta.json`` first (``meta``,
    when given, with a note that the directory is sealed, so a lost seal is noticed), then
    ``microadam-digests.json``: the size and SHA-256 of every file, and last its own SHA-256."""
    directory = Path(directory)
    if meta is not None:
        _write_synced(directory / TRAIN_META, json.dumps({**meta, "digests": DIGESTS}))
    files = {}
    for f in sorted(directory.rglob("*")):
        if f.is_file() and f.name != DIGESTS:
            files[f.relative_to(directory).as_posix()] = {"bytes": f.stat().st_size, "sha256": sha256_of(f)}
    body = {"format": DIGESTS_FORMAT, "version": 1, "files": files}
    _write_synced(directory / DIGESTS, _sealed_json(body, "digests_sha256"))
    return directory


def _train_meta(path: Path) -> dict:
    meta, _ = _read_json(path, "training metadata")
    step = meta.get("step")
    if not (step is None or (isinstance(step, int) and not isinstance(step, bool) and step >= 0)):
        raise CheckpointError(f"{path}: step is {step!r}, expected an integer >= 0: the file is corrupted")
    return meta


def _read_digests(directory: Path) -> dict | None:
    """The files a seal lists (each checked to exist with its size; the small ones by digest too), or
    None when the directory has no seal (and its train_meta.json does not say it had one)."""
    path = directory / DIGESTS
    if not path.exists():
        meta_path = directory / TRAIN_META
        if meta_path.exists() and "digests" in _train_meta(meta_path):
            raise CheckpointError(f"{path} is missing, but {meta_path} records that the checkpoint was sealed with "
                                  "it: the checkpoint is damaged or incomplete")
        return None
    data, raw = _read_json(path, "digest file")
    if data.get("format") != DIGESTS_FORMAT or data.get("version") != 1:
        raise CheckpointError(f"{path} is not a microadam_dist digest file this version knows (format "
                              f"{data.get('format')!r}, version {data.get('version')!r})")
    _check_seal(path, data, raw, "digests_sha256", "digest file")
    files = _validated(path, _DIGESTS_SCHEMA, data, "digests")["files"]
    for rel, info in files.items():
        _validated(path, _relative_path, rel, "digests.files")
        f = directory / rel
        if not f.is_file():
            raise CheckpointError(f"{f} is missing: the checkpoint is incomplete (it is listed in {path})")
        size = f.stat().st_size
        if size != info["bytes"]:
            raise CheckpointError(f"{f} has {size} bytes, {path} says {info['bytes']}: the file is truncated, "
                                  "extended or was replaced")
        if size <= _SMALL_FILE and sha256_of(f) != info["sha256"]:
            raise CheckpointError(f"{f}: SHA-256 differs from {path}: the file is corrupted")
    return files


def _digest_problems(directory: Path, files: dict) -> list[str]:
    problems = []
    for rel, info in files.items():
        try:
            if sha256_of(directory / rel) != info["sha256"]:
                problems.append(f"{directory / rel}: SHA-256 differs from {DIGESTS} (corrupted)")
        except OSError as e:
            problems.append(f"{directory / rel} cannot be read ({e})")
    return problems


def _check_groups(path: Path, groups: list[dict]) -> None:
    """The hyperparameters a DCP or DeepSpeed checkpoint holds, by MicroAdam's own rules."""
    for i, g in enumerate(groups):
        plain = {k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()}
        _validated(path, _hyperparameters, plain, f"optimizer parameter group {i}")


class _FileSlice(io.RawIOBase):
    """A read-only window [start, start + length) of an open file (a DCP item, for zipfile)."""

    def __init__(self, f, start: int, length: int):
        self._f, self._start, self._length, self._pos = f, start, length, 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def seek(self, pos, whence=0):
        base = {0: 0, 1: self._pos, 2: self._length}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def tell(self):
        return self._pos

    def readinto(self, b):
        n = max(0, min(len(b), self._length - self._pos))
        self._f.seek(self._start + self._pos)
        got = self._f.readinto(memoryview(b)[:n]) if n else 0
        self._pos += got
        return got


def _zip_problem(fileobj) -> str | None:
    """Whether a torch.save archive reads back with every record's CRC-32 intact (None: it does)."""
    try:
        with zipfile.ZipFile(fileobj) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError, KeyError, NotImplementedError,
            RuntimeError, OverflowError) as e:
        return f"not a readable torch.save archive ({type(e).__name__}: {e})"
    return None if bad is None else f"record {bad!r} fails its CRC-32 (corrupted)"


# ---- DCP (FSDP2) ----------------------------------------------------------------------------------
class DCPCheckpoint(Checkpoint):
    """A DCP checkpoint in ``microadam_dist.train``'s layout (``{"model": ..., "optim": ...}`` as
    produced by ``torch.distributed.checkpoint.state_dict.get_state_dict``), read one tensor at a time."""

    kind = "dcp"

    def __init__(self, path: Path):
        super().__init__(path)
        self._digests = _read_digests(self.path)
        with _damaged(self.path, "the DCP checkpoint is damaged or truncated"):
            self._open()
        _check_groups(self.path, self.groups)

    def _open(self) -> None:
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

        try:
            self._meta = FileSystemReader(str(self.path)).read_metadata()
        except Exception as e:  # noqa: BLE001 (pickle, EOF, ...: all mean the same to the user)
            raise CheckpointError(f"{self.path / '.metadata'} cannot be read ({type(e).__name__}: {e}): the DCP "
                                  "checkpoint is truncated or corrupted") from e
        md = self._meta.state_dict_metadata
        self._items: dict[str, list] = {}  # data file -> [(offset, length, transformed)] of its items
        for item in self._meta.storage_data.values():
            self._items.setdefault(item.relative_path, []).append(
                (item.offset, item.length, bool(getattr(item, "transform_descriptors", None))))
        for fname, items in self._items.items():
            fpath = self.path / fname
            if not fpath.is_file():
                raise CheckpointError(f"{fpath} is missing: the DCP checkpoint is incomplete")
            end, size = max(o + n for o, n, _ in items), fpath.stat().st_size
            if size < end:
                raise CheckpointError(f"{fpath} has {size} bytes, its items end at byte {end}: the file is truncated")
        self._tensors = {k: v for k, v in md.items() if isinstance(v, TensorStorageMetadata)}
        byte_keys = [k for k, v in md.items() if isinstance(v, BytesStorageMetadata)]
        group_keys = sorted({int(m.group(1)) for k in byte_keys if (m := re.match(r"optim\.param_groups\.(\d+)\.", k))})
        if not group_keys:
            raise CheckpointError(f"{self.path} has no optimizer parameter groups (optim.param_groups.*): not a "
                                  "checkpoint of an optimizer saved with get_state_dict")
        values = self._load({k for k in byte_keys if k.startswith("optim.param_groups.")})
        state_fields = {k.rsplit(".", 1)[1] for k in self._tensors if k.startswith("optim.state.")}
        if not set(FIELDS) & state_fields and state_fields:
            raise CheckpointError(f"{self.path} holds the state of another optimizer (fields "
                                  f"{sorted(state_fields)}), not MicroAdam's")
        for g in group_keys:
            group = {key: values.get(f"optim.param_groups.{g}.{key}", HYPER_DEFAULTS.get(key)) for key in HYPER_KEYS}
            missing = [key for key in GEOMETRY_KEYS if group[key] is None]
            if missing:
                raise CheckpointError(f"{self.path} holds the state of another optimizer: its parameter group {g} "
                                      f"has no {missing} (MicroAdam's geometry)")
            self.groups.append(group)
            for name in values[f"optim.param_groups.{g}.params"]:
                key = f"model.{name}"
                if key not in self._tensors:
                    raise CheckpointError(f"{self.path}: parameter {name!r} of the optimizer has no model.{name} "
                                          "weight")
                self.params[name] = ParamEntry(name, tuple(self._tensors[key].size), g)
        meta_file = self.path / TRAIN_META
        steps = []
        if meta_file.exists():
            self.step = _train_meta(meta_file).get("step")
        else:
            steps = [int(v) for v in self._load({k for k in self._tensors if k.endswith(".step")}).values()]
            self.step = max(steps, default=0)

    def _load(self, keys: set[str]) -> dict[str, Any]:
        from torch.distributed.checkpoint.api import CheckpointException
        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

        if not keys:
            return {}
        try:
            with warnings.catch_warnings():  # "torch.distributed is unavailable": reading offline is the point
                warnings.simplefilter("ignore", UserWarning)
                flat = _load_state_dict_from_keys(keys, checkpoint_id=str(self.path))
        except (Exception, CheckpointException) as e:  # noqa: BLE001 (DCP's own is a BaseException)
            if isinstance(e, CheckpointException) and e.failures:  # the cause, without DCP's traceback text
                e = next(iter(e.failures.values()))[0]
            raise CheckpointError(f"{self.path}: reading {sorted(keys)[:3]} failed ({type(e).__name__}: {e}): the "
                                  "DCP checkpoint is truncated or corrupted") from e
        return {key: _lookup(flat, key) for key in keys}

    def has_state(self, name):
        return f"optim.state.{name}.step" in self._tensors

    def weight(self, name):
        with _damaged(self.path, "the DCP checkpoint is damaged"):
            weight = self._load({f"model.{name}"})[f"model.{name}"]
        if not isinstance(weight, torch.Tensor):
            raise CheckpointError(f"{self.path}: model.{name} is not a tensor: the DCP checkpoint is damaged")
        return weight

    def verify(self) -> list[str]:
        if self._digests is not None:
            return _digest_problems(self.path, self._digests)
        problems = []  # no digests: what the format itself can tell
        for fname, items in sorted(self._items.items()):
            fpath, end = self.path / fname, max(o + n for o, n, _ in items)
            if fpath.stat().st_size != end:
                problems.append(f"{fpath} has {fpath.stat().st_size - end} bytes after its last item (appended or "
                                "overwritten)")
            with open(fpath, "rb") as f:  # every item is a torch.save archive: check its CRC-32s
                for offset, length, transformed in items:
                    if not transformed:
                        problem = _zip_problem(_FileSlice(f, offset, length))
                        if problem:
                            problems.append(f"{fpath} at byte {offset}: {problem}")
        return problems

    def unverified(self) -> list[str]:
        if self._digests is not None:
            return []
        return [f"{self.path}: no {DIGESTS} (not written by microadam_dist, or by a version before digests): the "
                "data items' CRC-32s were checked, but .metadata and the files' layout have no checksum"]

    def state(self, name):
        keys = {f"optim.state.{name}.{key}" for key in FIELDS}
        present = keys & set(self._tensors)
        if not present:
            return None
        with _damaged(self.path, "the DCP checkpoint is damaged"):
            values = self._load(present)
        st = {key: values.get(f"optim.state.{name}.{key}") for key in FIELDS}
        from .fsdp import narrow_saved  # FSDP2 exports window indices as int32

        return narrow_saved(st)


def _lookup(nested: Any, key: str) -> Any:
    """The value of a flat DCP key ("optim.state.blocks.0.attn.weight.step") in the nested dict DCP
    returns (parameter names keep their dots: at each level take the longest key that matches)."""
    tokens = key.split(".")
    node = nested
    while tokens:
        if isinstance(node, list):
            node, tokens = node[int(tokens[0])], tokens[1:]
            continue
        for cut in range(len(tokens), 0, -1):
            head = ".".join(tokens[:cut])
            if head in node:
                node, tokens = node[head], tokens[cut:]
                break
        else:
            raise KeyError(key)
    return node


# ---- DeepSpeed ZeRO ---------------------------------------------------------------------------------
_RANK_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")


class DeepSpeedCheckpoint(Checkpoint):
    """A DeepSpeed ZeRO-1/2/3 checkpoint written by ``engine.save_checkpoint`` with MicroAdam.

    Each rank's file holds its fp32 master partition(s) and MicroAdam's flat partition state with
    the layout MicroAdam adds (``deepspeed_zero.LAYOUT_KEY``: which elements of which parameter
    sit where, and their names). Files are memory-mapped, so only what is read is loaded.
    """

    kind = "deepspeed"

    def __init__(self, path: Path):
        super().__init__(path)
        self._segment_cache: dict[tuple[int, int], Any] = {}  # (rank, partition) -> _build_segments
        self._digests = _read_digests(self.path)
        with _damaged(self.path, "the DeepSpeed checkpoint is damaged or truncated"):
            self._open()
        _check_groups(self.path, self.groups)

    def _open(self) -> None:
        tag_dir = self.path
        if (self.path / "latest").exists():
            tag = (self.path / "latest").read_text().strip()
            tag_dir = self.path / tag
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", tag) or not tag_dir.is_dir():
                raise CheckpointError(f"{self.path / 'latest'} names the tag {tag!r}, which is not a directory in "
                                      f"{self.path}: the file is damaged or the tag directory is missing")
        self.tag_dir = tag_dir
        files = {int(m.group(1)): tag_dir / f for f in os.listdir(tag_dir) if (m := _RANK_FILE.match(f))}
        if not files:
            raise CheckpointError(f"{tag_dir} holds no ZeRO optimizer files (*zero_pp_rank_*_optim_states.pt): "
                                  "not a DeepSpeed ZeRO-1/2/3 checkpoint")
        self.world_size = max(files) + 1
        first = self._load_rank_file(files[min(files)])
        partitions = first[1].get("partitions", {}) if first[1] else {}
        if partitions:  # the world size each rank recorded, so a lost last rank is noticed too
            self.world_size = max(self.world_size, *(int(info["world_size"]) for info in partitions.values()))
        missing = sorted(set(range(self.world_size)) - set(files))
        if missing:
            raise CheckpointError(f"{tag_dir}: the optimizer files of ranks {missing} are missing: the checkpoint "
                                  "is incomplete")
        self._pieces: dict[str, list] = {}  # name -> [(rank, part index, start, numel, offset)]
        self._ranks = []
        self._layouts = []  # per rank: the saved layout's partitions
        group_of_index: dict[int, int] = {}
        for rank in range(self.world_size):
            base, layout, flats = first if rank == min(files) else self._load_rank_file(files[rank])
            if rank == 0:
                self.groups = [{key: g.get(key, HYPER_DEFAULTS.get(key)) for key in HYPER_KEYS}
                               for g in base["param_groups"]]
                for gi, g in enumerate(base["param_groups"]):
                    for index in g["params"]:
                        group_of_index[index] = gi
            self._ranks.append((base["state"], list(flats)))
            self._layouts.append(layout["partitions"])
            for index, info in layout["partitions"].items():
                if info["world_size"] != self.world_size or info["rank"] != rank:
                    raise CheckpointError(f"{files[rank]} was written by rank {info['rank']} of "
                                          f"{info['world_size']}, but sits among {self.world_size} rank files")
                for (key, shape, start, numel, offset), name in zip(info["pieces"], info["names"]):
                    if name is None:
                        raise CheckpointError(f"{files[rank]}: parameter names were not recorded (MicroAdam was "
                                              "given to DeepSpeed without attach(engine)); cannot map the state")
                    if name not in self.params:
                        self.params[name] = ParamEntry(name, tuple(shape), group_of_index[int(index)])
                    self._pieces.setdefault(name, []).append((rank, int(index), start, numel, offset))
        # DeepSpeed's own load needs the model states: one file, or one per rank under ZeRO-3
        models = [tag_dir / "mp_rank_00_model_states.pt"]
        if not models[0].exists():
            models = [tag_dir / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(self.world_size)]
            lost = [m.name for m in models if not m.exists()]
            if lost:
                raise CheckpointError(f"{tag_dir}: the model states {lost[:3]} are missing (mp_rank_00_model_states.pt, "
                                      "or one per rank under ZeRO-3): the checkpoint is incomplete")
        self._files = [*files.values(), *models]
        try:
            model_sd = torch.load(models[0], map_location="cpu", mmap=True, weights_only=False)
        except Exception as e:  # noqa: BLE001 (zip, pickle, EOF: all mean the same to the user)
            raise CheckpointError(f"{models[0]} cannot be loaded ({type(e).__name__}: {e}): the file is truncated "
                                  "or corrupted") from e
        step = model_sd.get("global_steps")
        if not (step is None or (isinstance(step, int) and step >= 0)):
            raise CheckpointError(f"{models[0]}: global_steps is {step!r}: the file is corrupted")
        self.step = step

    def verify(self) -> list[str]:
        if self._digests is not None:
            return _digest_problems(self.path, self._digests)
        problems = []
        for f in self._files:  # no digests: the CRC-32 of every record of each torch.save archive
            with open(f, "rb") as fh:
                problem = _zip_problem(fh)
            if problem:
                problems.append(f"{f}: {problem}")
        return problems

    def unverified(self) -> list[str]:
        if self._digests is not None:
            return []
        return [f"{self.path}: no {DIGESTS} (saved by DeepSpeed directly, not through microadam_dist.train): every "
                "record's CRC-32 was checked, but bytes outside the records (zip headers, padding, appended data) and "
                "the tag in 'latest' have no checksum"]

    @staticmethod
    def _load_rank_file(path: Path):
        """(MicroAdam's state_dict, its ZeRO layout, the fp32 partitions) of one rank's file."""
        from .deepspeed_zero import LAYOUT_KEY

        try:
            sd = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{path} cannot be loaded ({type(e).__name__}: {e}): the file is truncated or "
                                  "corrupted") from e
        osd = sd.get("optimizer_state_dict", {})
        base = osd.get("base_optimizer_state", osd.get("optimizer_state_dict"))
        flats = osd.get("single_partition_of_fp32_groups", osd.get("fp32_flat_groups"))
        if not isinstance(base, dict) or flats is None:
            raise CheckpointError(f"{path} is not a ZeRO-1/2/3 optimizer file this tool knows (no base optimizer "
                                  "state or fp32 partitions); DeepSpeed's bf16 optimizer without ZeRO is not supported")
        layout = base.get(LAYOUT_KEY)
        if layout is None:
            groups = base.get("param_groups", [{}])
            raise CheckpointError(f"{path} holds no MicroAdam state (optimizer hyperparameters "
                                  f"{sorted(k for k in groups[0] if k != 'params')}): it was saved with another "
                                  "optimizer")
        return base, layout, flats

    def _segments(self, rank: int, index: int):
        """Every parameter piece of one partition as sharded.Segment objects, and their state views
        (views into the memory-mapped file, built once per partition)."""
        if (rank, index) not in self._segment_cache:
            self._segment_cache[(rank, index)] = self._build_segments(rank, index)
        return self._segment_cache[(rank, index)]

    def _build_segments(self, rank: int, index: int):
        from .deepspeed_zero import ZeroAdapter
        from .sharded import Segment

        state, flats = self._ranks[rank]
        flat = flats[index]
        pieces = [(name, p) for name, items in self._pieces.items() for p in items if p[0] == rank and p[1] == index]
        pieces.sort(key=lambda item: item[1][4])  # by offset: the order of the saved layout
        segs = []
        for name, (_, _, start, numel, offset) in pieces:
            group = self.groups[self.params[name].group]
            segs.append(Segment(key=name, geometry=self.geometry(name), start=start, param=flat[offset:offset + numel],
                                grad=None, group=group))
        st = state.get(index)
        return segs, (ZeroAdapter._views(segs, st) if st else None)

    def has_state(self, name):
        return all(self._ranks[rank][0].get(index) for rank, index, *_ in self._pieces[name])

    def weight(self, name):
        with _damaged(self.tag_dir, "the DeepSpeed checkpoint is damaged"):
            return self._weight(name)

    def _weight(self, name):
        entry = self.params[name]
        out = torch.empty(math.prod(entry.shape), dtype=torch.float32)
        covered = 0
        for rank, index, start, numel, offset in self._pieces[name]:
            out[start:start + numel] = self._ranks[rank][1][index][offset:offset + numel]
            covered += numel
        if covered != out.numel():
            raise CheckpointError(f"{self.tag_dir}: parameter {name!r}: the rank files hold {covered} of its "
                                  f"{out.numel()} elements")
        return out.view(entry.shape)

    def state(self, name):
        with _damaged(self.tag_dir, "the DeepSpeed checkpoint is damaged"):
            return self._state(name)

    def _state(self, name):
        geom = self.geometry(name)
        window = self.groups[self.params[name].group]["window_size"]
        blocks = []
        for rank, index in sorted({(r, i) for r, i, *_ in self._pieces[name]}):
            segs, views = self._segments(rank, index)
            if views is None:
                return None  # saved before the first step
            for seg in segs:
                if seg.key == name:
                    b0, b1 = seg.owned_blocks()
                    if b1 > b0:
                        blocks.append((b0, b1, views[name]))
        try:
            joined = join_owned_blocks(blocks, geom, window)
        except ValueError as e:
            raise CheckpointError(f"{self.tag_dir}: parameter {name!r}: {e}") from e
        return {k: v.clone() for k, v in joined.items()}


def open_checkpoint(path) -> Checkpoint:
    """Open a canonical, DCP or DeepSpeed checkpoint (detected from its files)."""
    path = Path(path)
    if not path.exists() and previous_of(path).is_dir():
        warnings.warn(f"{path} is missing: an overwrite was interrupted while swapping it in; reading the previous "
                      f"checkpoint, kept at {previous_of(path)}", stacklevel=2)
        path = previous_of(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if path.is_file():
        raise CheckpointError(f"{path} is a file; a checkpoint is a directory (canonical, DCP or DeepSpeed)")
    if path.name.endswith(".partial"):  # the writers' temporary names (tool and main job)
        raise CheckpointError(f"{path} is an incomplete checkpoint (a write was interrupted before it was renamed "
                              "into place): use the previous one")
    if (path / MANIFEST).exists():
        return CanonicalCheckpoint(path)
    if (path / ".metadata").exists():
        return DCPCheckpoint(path)
    if (path / "latest").exists() or any(_RANK_FILE.match(f) for f in os.listdir(path)):
        return DeepSpeedCheckpoint(path)
    if any(path.glob("*.safetensors")):
        raise CheckpointError(f"{path} has safetensors files but no {MANIFEST}: an interrupted or foreign write; "
                              "the manifest is written last, so this checkpoint is incomplete")
    raise CheckpointError(f"{path} is not a checkpoint this tool knows: expected a canonical directory "
                          f"({MANIFEST}), a DCP checkpoint (.metadata) or a DeepSpeed checkpoint (latest, "
                          "zero_pp_rank_*_optim_states.pt)")


# ---- writing --------------------------------------------------------------------------------------
_USE_EXCHANGE = True  # False: always the OUT.old fallback (filesystems without RENAME_EXCHANGE; tests)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directory entries in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where
    the platform or the filesystem cannot."""
    import ctypes
    import errno

    if not _USE_EXCHANGE:
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(b))


def previous_of(out: Path) -> Path:
    """Where an overwrite keeps the previous checkpoint while it swaps the new one in (the fallback
    when the two cannot be exchanged atomically); open_checkpoint reads it if ``out`` is missing."""
    return out.with_name(out.name + ".old")


@contextlib.contextmanager
def atomic_directory(out, overwrite: bool = False) -> Iterator[Path]:
    """A temporary directory beside ``out``, renamed to ``out`` when the block completes.

    On an error the temporary directory is removed and ``out`` is untouched; an existing ``out``
    is refused unless ``overwrite``. An overwrite never leaves a moment without a complete
    checkpoint: the new directory and ``out`` are exchanged atomically (renameat2), or, where that
    is not available, ``out`` is renamed to ``out.old`` first, which open_checkpoint reads when a
    crash left ``out`` missing (as train.complete_checkpoint does for the main job).
    """
    out = Path(out)
    old = previous_of(out)
    if (out.exists() or old.exists()) and not overwrite:
        raise CheckpointError(f"{out} exists; choose another output or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{os.getpid()}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        if not out.exists():
            os.rename(tmp, out)
        elif _exchange(tmp, out):  # out is the new checkpoint, tmp the previous one
            shutil.rmtree(tmp)
        else:
            if old.exists():  # left by a crash after the swap: out is complete, old is stale
                shutil.rmtree(old)
            os.rename(out, old)
            os.rename(tmp, out)
        if old.exists():
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


# Safetensors files written and read as streams: the format (an 8-byte header length, a JSON header
# of dtypes, shapes and byte offsets, then the raw data) lets a writer that knows every tensor's
# shape up front emit the header first and the tensors one at a time, and a reader seek to one
# tensor; the safetensors library holds a whole file in memory to write and memory-maps to read,
# which would make a conversion's resident memory grow with the checkpoint.
_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.int16: "I16", torch.uint8: "U8",
              torch.int64: "I64", torch.float16: "F16", torch.int32: "I32", torch.float64: "F64"}
_ST_FROM = {v: k for k, v in _ST_DTYPES.items()}


def _byte_view(t: torch.Tensor):
    return t.reshape(-1).view(torch.uint8).numpy()


def _safetensors_entry(v, where):
    entry = _record({"dtype": _string("|".join(_ST_FROM)), "shape": _list_of(_integer(0)),
                     "data_offsets": _list_of(_integer(0), 2)})(v, where)
    begin, end = entry["data_offsets"]
    if end < begin or (end - begin) != math.prod(entry["shape"]) * _ST_FROM[entry["dtype"]].itemsize:
        raise _Bad(f"{where} has {end - begin} bytes for {entry['dtype']} {entry['shape']}")
    return entry


def read_safetensors_header(path: Path) -> dict:
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or 8 + n > size:
                raise ValueError(f"header length {n} does not fit in {size} bytes")
            header = json.loads(f.read(n), object_pairs_hook=_no_duplicate_keys)
    except (ValueError, UnicodeDecodeError, RecursionError, OSError) as e:
        raise CheckpointError(f"{path} cannot be read as safetensors ({e}): the file is corrupted") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} cannot be read as safetensors (its header is not an object): corrupted")
    metadata = header.pop("__metadata__", None)
    _validated(path, _optional(_mapping(_string())), metadata, "safetensors __metadata__")
    header = _validated(path, _mapping(_safetensors_entry), header, "safetensors header")
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if 8 + n + end > size:
        raise CheckpointError(f"{path} is truncated: its header promises {8 + n + end} bytes, the file has {size}")
    header["__data_start__"] = 8 + n
    return header


def read_safetensors_tensor(path: Path, header: dict, key: str) -> torch.Tensor:
    info = header.get(key)
    if info is None:
        raise CheckpointError(f"{path} has no tensor {key!r}: the file does not match its manifest")
    begin, end = info["data_offsets"]
    t = torch.empty(info["shape"], dtype=_ST_FROM[info["dtype"]])  # sizes checked with the header
    try:
        with open(path, "rb") as f:
            f.seek(header["__data_start__"] + begin)
            if t.numel() and f.readinto(_byte_view(t)) != end - begin:
                raise CheckpointError(f"{path} is truncated inside tensor {key!r}")
    except OSError as e:
        raise CheckpointError(f"{path} cannot be read ({e})") from e
    return t


class _ShardWriter:
    """Safetensors files of at most ~``limit`` bytes each, planned up front, written tensor by tensor.

    ``plan(groups)`` takes, in write order, groups of (key, shape, dtype) that stay in one file (a
    parameter's state) and returns each group's file name; ``write(key, tensor)`` then streams the
    tensors in that same order. SHA-256 and sizes are taken while writing."""

    def __init__(self, directory: Path, prefix: str, limit: int):
        self.directory, self.prefix, self.limit = directory, prefix, limit
        self.layout: list[list[tuple]] = []  # per file: [(key, shape, dtype, nbytes)]
        self.files: dict[str, dict] = {}
        self._file = None
        self._index = -1
        self._pos = 0

    def plan(self, groups: list[list[tuple]]) -> list[str]:
        names, size = [], 0
        for group in groups:
            nbytes = sum(math.prod(shape) * dtype.itemsize for _, shape, dtype in group)
            if not self.layout or (self.layout[-1] and size + nbytes > self.limit):
                self.layout.append([])
                size = 0
            self.layout[-1].extend((key, shape, dtype, math.prod(shape) * dtype.itemsize) for key, shape, dtype in group)
            size += nbytes
            names.append(self._name(len(self.layout) - 1))
        return names

    def _name(self, i: int) -> str:
        return f"{self.prefix}-{i + 1:05d}.safetensors"

    def _open_next(self) -> None:
        self._close()
        self._index += 1
        self._pos = 0
        header, offset = {}, 0
        for key, shape, dtype, nbytes in self.layout[self._index]:
            header[key] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self._file = open(self.directory / self._name(self._index), "wb")
        self._hash = hashlib.sha256()
        self._emit(len(blob).to_bytes(8, "little") + blob)

    def _emit(self, data) -> None:
        self._file.write(data)
        self._hash.update(data)

    def write(self, key: str, tensor: torch.Tensor) -> None:
        if self._file is None or self._pos == len(self.layout[self._index]):
            self._open_next()
        want_key, shape, dtype, _ = self.layout[self._index][self._pos]
        if key != want_key or tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            raise CheckpointError(f"internal: expected {want_key} {tuple(shape)} {dtype}, got {key} "
                                  f"{tuple(tensor.shape)} {tensor.dtype}")
        if tensor.numel():
            self._emit(memoryview(_byte_view(tensor.detach().cpu().contiguous())))
        self._pos += 1

    def _close(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            path = self.directory / self._name(self._index)
            self.files[path.name] = {"bytes": path.stat().st_size, "sha256": self._hash.hexdigest()}
            self._file = None

    def finish(self) -> None:
        while self._index + 1 < len(self.layout):  # files whose tensors were all empty
            self._open_next()
        self._close()


def _progress(iterable, total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="param", disable=not enabled or None, leave=False)


def _weight_of(ckpt: Checkpoint, name: str) -> torch.Tensor | None:
    weight = ckpt.weight(name)
    if weight is not None:
        entry = ckpt.params[name]
        if tuple(weight.shape) != entry.shape:
            raise CheckpointError(f"{ckpt.path}: weight of {name!r} is {tuple(weight.shape)}, expected {entry.shape}")
        weight = weight.to(torch.float32)
    return weight


def canonical_parameter(ckpt: Checkpoint, name: str) -> tuple[torch.Tensor | None, dict | None]:
    """The weight and checked state of one parameter."""
    return _weight_of(ckpt, name), ckpt.checked_state(name)


def write_canonical(ckpt: Checkpoint, out, *, world_size: int | None = None, shard_bytes: int = DEFAULT_SHARD_BYTES,
                    overwrite: bool = False, progress: bool = True, note: str | None = None) -> Path:
    """Write ``ckpt`` as a canonical directory (``world_size``: the intended one, recorded only)."""
    started = time.time()
    names = list(ckpt.params)
    with atomic_directory(out, overwrite) as tmp:
        weights, states = _ShardWriter(tmp, "weights", shard_bytes), _ShardWriter(tmp, "state", shard_bytes)
        # what each parameter holds is known before any data is read (weights: all or none)
        has_weight = ckpt.has_weights()
        has_state = {name: ckpt.has_state(name) for name in names}
        weight_files = weights.plan([[(n, ckpt.params[n].shape, torch.float32)] for n in names] if has_weight else [])
        state_shapes = {n: canonical_shapes(ckpt.geometry(n), ckpt.groups[ckpt.params[n].group]["window_size"])
                        for n in names if has_state[n]}
        state_files = iter(states.plan([[(f"{n}/{k}", state_shapes[n][k], STATE_DTYPES[k]) for k in FIELDS]
                                        for n in names if has_state[n]]))
        params = {}
        for i, name in enumerate(_progress(names, len(names), "canonical", progress)):
            weight, st = canonical_parameter(ckpt, name)
            files = {}
            if has_weight:
                if weight is None:
                    raise CheckpointError(f"{ckpt.path}: parameter {name!r} has no weight, others do")
                weights.write(name, weight)
                files["weight"] = weight_files[i]
            if has_state[name]:
                if st is None:
                    raise CheckpointError(f"{ckpt.path}: parameter {name!r} lost its state between reads")
                for key in FIELDS:
                    states.write(f"{name}/{key}", st[key])
                files["state"] = next(state_files)
            entry = ckpt.params[name]
            params[name] = {"shape": list(entry.shape), "group": entry.group, "files": files}
            del weight, st
        weights.finish()
        states.finish()
        manifest = {
            "format": FORMAT, "version": FORMAT_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "source": {"kind": ckpt.kind, "path": str(ckpt.path), "world_size": ckpt.world_size},
            "world_size": world_size, "note": note, "step": ckpt.step,
            "param_groups": [_jsonable(g) for g in ckpt.groups],
            "params": params, "files": {**weights.files, **states.files},
        }
        _write_synced(tmp / MANIFEST, _sealed_json(manifest, MANIFEST_DIGEST))
    return Path(out)


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _jsonable(group: dict) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items()}


def write_dcp(ckpt: Checkpoint, out, *, overwrite: bool = False, progress: bool = True) -> Path:
    """Write ``ckpt`` as a DCP checkpoint in ``microadam_dist.train``'s layout: FSDP2 loads it at any
    world size (``dcp.load`` + ``set_state_dict``). Tensors are read from the source only when DCP
    writes them, one at a time."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    # the nested layout get_state_dict produces; DCP flattens it to "model.<name>",
    # "optim.state.<name>.<field>", "optim.param_groups.<g>.<key>" (meta tensors: read when written)
    model: dict[str, Any] = {}
    optim_state: dict[str, dict] = {}
    loaders: dict[str, tuple] = {}
    for name, entry in ckpt.params.items():
        model[name] = torch.empty(entry.shape, dtype=torch.float32, device="meta")
        loaders[f"model.{name}"] = (name, None)
        group = ckpt.groups[entry.group]
        optim_state[name] = {}
        for key, shape in canonical_shapes(ckpt.geometry(name), group["window_size"]).items():
            optim_state[name][key] = torch.empty(shape, dtype=STATE_DTYPES[key], device="meta")
            loaders[f"optim.state.{name}.{key}"] = (name, key)
    param_groups = []
    for g, group in enumerate(ckpt.groups):
        param_groups.append({**{key: (tuple(group[key]) if key == "betas" else group[key]) for key in HYPER_KEYS},
                             "params": [n for n, e in ckpt.params.items() if e.group == g]})
    nested = {"model": model, "optim": {"state": optim_state, "param_groups": param_groups}}
    missing_state = [n for n in ckpt.params if not ckpt.has_state(n)]
    if missing_state:
        raise CheckpointError(f"{ckpt.path}: parameters {missing_state[:5]} have no optimizer state yet (saved "
                              "before the first step); DCP needs it: take a step first")
    bar = _progress(None, len(loaders), "dcp", progress)
    cache: dict[str, tuple] = {}

    class LazyPlanner(DefaultSavePlanner):
        def lookup_object(self, index):
            fqn = index.fqn
            if fqn not in loaders:
                return super().lookup_object(index)
            name, key = loaders[fqn]
            part = "weight" if key is None else "state"
            if cache.get("at") != (name, part):  # one parameter's weight or state in memory at a time
                cache.clear()
                cache["at"] = (name, part)
                cache["value"] = _weight_of(ckpt, name) if key is None else ckpt.checked_state(name)
            bar.update(1)
            value = cache["value"]
            if value is None:
                raise CheckpointError(f"{ckpt.path}: parameter {name!r} has no {part}; DCP needs one")
            return value if key is None else value[key]

    with atomic_directory(out, overwrite) as tmp:
        # a file per tensor: DCP keeps every tensor of a file in memory until the file is closed
        dcp.save(nested, storage_writer=dcp.FileSystemWriter(str(tmp), thread_count=1, single_file_per_rank=False),
                 planner=LazyPlanner(), no_dist=True)
        seal(tmp, {"step": ckpt.step or 0, "losses": [], "history": [], "converted_from": str(ckpt.path)})
    bar.close()
    return Path(out)


def export_adam(ckpt: Checkpoint, out, *, overwrite: bool = False, progress: bool = True) -> Path:
    """Dense AdamW state rebuilt from the window, as a ``torch.save`` file (a directory with
    ``adamw_state.pt`` and ``README.txt``).

    For each parameter after t steps: exp_avg = (1 - b1) M, exp_avg_sq = (1 - b2) S, step = t, where
    M = sum_i b1^age_i v_i and S = sum_i b2^age_i v_i^2 over the window (ages 0..m-1): AdamW's
    next update m / (1 - b1^t) / (sqrt(v / (1 - b2^t)) + eps) then equals MicroAdam's
    c1 M / (sqrt(c2 S) + eps) with c1 = (1 - b1) / (1 - b1^t), c2 = (1 - b2) / (1 - b2^t). The
    history older than the window (m steps) is absent, as it is in MicroAdam.
    """
    state, names = {}, list(ckpt.params)
    for i, name in enumerate(_progress(names, len(names), "export-adam", progress)):
        st = ckpt.checked_state(name)
        if st is None:
            continue
        group = ckpt.groups[ckpt.params[name].group]
        geom, t = ckpt.geometry(name), int(st["step"])
        b1, b2 = group["betas"]
        flat = from_row_form(st, geom, group["window_size"])
        cfg = StepConfig.from_group(group, step=t)
        M, S = dense_moments(geom, flat, cfg) if t > 0 else (torch.zeros(geom.numel), torch.zeros(geom.numel))
        shape = ckpt.params[name].shape
        state[i] = {"step": torch.tensor(float(t)), "exp_avg": (M * (1 - b1)).view(shape),
                    "exp_avg_sq": (S * (1 - b2)).view(shape)}
    groups = []
    for g, group in enumerate(ckpt.groups):
        groups.append({"lr": group["lr"], "betas": tuple(group["betas"]), "eps": group["eps"],
                       "weight_decay": group["weight_decay"], "amsgrad": False, "maximize": False,
                       "foreach": None, "capturable": False, "differentiable": False, "fused": None,
                       "params": [i for i, n in enumerate(names) if ckpt.params[n].group == g],
                       "param_names": [n for n in names if ckpt.params[n].group == g]})
    with atomic_directory(out, overwrite) as tmp:
        torch.save({"state": state, "param_groups": groups}, tmp / "adamw_state.pt")
        (tmp / "README.txt").write_text(
            "torch.optim.AdamW state rebuilt from MicroAdam's window (microadam-ckpt export-adam).\n"
            f"Source: {ckpt.path} ({ckpt.kind}), step {ckpt.step}.\n"
            "exp_avg = (1 - beta1) * M, exp_avg_sq = (1 - beta2) * S, step = t, with M and S the window sums.\n"
            "Parameters are numbered in the order of param_names; build AdamW over model parameters in that\n"
            "order (one group per entry) and call load_state_dict. DeepSpeed's Adam takes the same moments.\n")
    return Path(out)


# ---- one process: save and load a model with its MicroAdam ----------------------------------------
def _named(model, opt) -> tuple[dict[str, torch.nn.Parameter], dict[int, int]]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    group_of = {}
    for gi, group in enumerate(opt.param_groups):
        for p in group["params"]:
            if id(p) not in by_id:
                raise CheckpointError("the optimizer holds a parameter that is not in the model")
            group_of[id(p)] = gi
    return {by_id[id(p)]: p for g in opt.param_groups for p in g["params"]}, group_of


class _LiveCheckpoint(Checkpoint):
    kind = "single"

    def __init__(self, model, opt):
        super().__init__(Path("<memory>"))
        self._params, group_of = _named(model, opt)
        self.groups = [{k: (tuple(g[k]) if k == "betas" else g.get(k, HYPER_DEFAULTS.get(k))) for k in HYPER_KEYS}
                       for g in opt.param_groups]
        self.params = {n: ParamEntry(n, tuple(p.shape), group_of[id(p)]) for n, p in self._params.items()}
        self._opt = opt
        self.world_size = 1
        steps = [int(opt.state[p]["step"]) for p in self._params.values() if opt.state.get(p)]
        self.step = max(steps, default=0)

    def has_state(self, name):
        return bool(self._opt.state.get(self._params[name]))

    def weight(self, name):
        return self._params[name].detach().float().cpu()

    def state(self, name):
        p = self._params[name]
        st = self._opt.state.get(p)
        if not st:
            return None
        group = self.groups[self.params[name].group]
        return {k: v.cpu() for k, v in to_row_form(st, self.geometry(name), group["window_size"],
                                                   self.geometry(name).rows).items()}


def save(model, opt, out, *, overwrite: bool = True, progress: bool = False) -> Path:
    """Save a single-process model and its MicroAdam as a canonical checkpoint."""
    return write_canonical(_LiveCheckpoint(model, opt), out, world_size=1, overwrite=overwrite, progress=progress)


def load(model, opt, path, *, progress: bool = False) -> Checkpoint:
    """Load any checkpoint (canonical, DCP, DeepSpeed) into a single-process model and its MicroAdam.

    Refuses a checkpoint of another model (missing, extra or reshaped parameters are named) or
    another MicroAdam geometry before anything is changed.
    """
    ckpt = path if isinstance(path, Checkpoint) else open_checkpoint(path)
    params, group_of = _named(model, opt)
    check_compatible(ckpt, {n: tuple(p.shape) for n, p in params.items()},
                     {n: opt.param_groups[group_of[id(p)]] for n, p in params.items()})
    loaded = {}
    for name in _progress(params, len(params), "load", progress):  # read everything before touching the model
        loaded[name] = canonical_parameter(ckpt, name)
    with torch.no_grad():
        for name, p in params.items():
            weight, st = loaded[name]
            if weight is not None:
                p.copy_(weight.to(p.dtype))
            if st is None:
                opt.state.pop(p, None)
                continue
            group = opt.param_groups[group_of[id(p)]]
            flat = from_row_form(st, ckpt.geometry(name), group["window_size"])
            opt.state[p] = {k: (v if k == "step" else v.to(p.device)) for k, v in flat.items()}
    return ckpt


def check_compatible(ckpt: Checkpoint, shapes: dict[str, tuple], groups: dict[str, dict]) -> None:
    """Raise CheckpointError naming every missing, extra or reshaped parameter, or a geometry mismatch."""
    missing = [n for n in shapes if n not in ckpt.params]
    extra = [n for n in ckpt.params if n not in shapes]
    reshaped = [f"{n} {ckpt.params[n].shape} -> {shapes[n]}" for n in shapes
                if n in ckpt.params and ckpt.params[n].shape != tuple(shapes[n])]
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
        for key in GEOMETRY_KEYS:
            if not same_geometry_setting(key, saved[key], group[key]):
                raise CheckpointError(f"{ckpt.path}: parameter {name!r} was saved with {key}={saved[key]!r}, this "
                                      f"optimizer has {key}={group[key]!r}; use the same MicroAdam geometry")
