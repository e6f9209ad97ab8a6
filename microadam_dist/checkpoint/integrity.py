"""Integrity of DCP and DeepSpeed directories: the package's seal, and the formats' own checksums.

A DCP or DeepSpeed directory written by this package (``write_dcp``, ``microadam_dist.train``)
is sealed with ``microadam-digests.json`` (:func:`seal`): the size and SHA-256 of every file, and
last the SHA-256 of the digest file itself. ``train_meta.json`` records that the directory was
sealed, so a lost seal is noticed. Directories without a seal (written by other code) are
checked as far as their format allows: the CRC-32 of every record of a ``torch.save`` archive.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path

from .atomic import write_synced
from .base import CheckpointError
from .schema import DIGESTS_SCHEMA, check_seal, hyperparameters, read_json, relative_path, sealed_json, validated

DIGESTS = "microadam-digests.json"  # the seal of a DCP or DeepSpeed directory written by this package
DIGESTS_FORMAT = "microadam-digests"
TRAIN_META = "train_meta.json"
_SMALL_FILE = 1 << 20  # files checked against their digest on every open (.metadata, latest, train_meta.json)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---- the seal ------------------------------------------------------------------------------------
def seal(directory, meta: dict | None = None) -> Path:
    """Seal a DCP or DeepSpeed directory this package wrote: ``train_meta.json`` first (``meta``,
    when given, with a note that the directory is sealed, so a lost seal is noticed), then
    ``microadam-digests.json``: the size and SHA-256 of every file, and last its own SHA-256."""
    directory = Path(directory)
    if meta is not None:
        write_synced(directory / TRAIN_META, json.dumps({**meta, "digests": DIGESTS}))
    files = {}
    for f in sorted(directory.rglob("*")):
        if f.is_file() and f.name != DIGESTS:
            files[f.relative_to(directory).as_posix()] = {"bytes": f.stat().st_size, "sha256": sha256_of(f)}
    body = {"format": DIGESTS_FORMAT, "version": 1, "files": files}
    write_synced(directory / DIGESTS, sealed_json(body, "digests_sha256"))
    return directory


def train_meta(path: Path) -> dict:
    """The training metadata a sealed directory carries (its ``step`` checked)."""
    meta, _ = read_json(path, "training metadata")
    step = meta.get("step")
    if not (step is None or (isinstance(step, int) and not isinstance(step, bool) and step >= 0)):
        raise CheckpointError(f"{path}: step is {step!r}, expected an integer >= 0: the file is corrupted")
    return meta


def read_digests(directory: Path) -> dict | None:
    """The files a seal lists (each checked to exist with its size; the small ones by digest too), or
    None when the directory has no seal (and its train_meta.json does not say it had one)."""
    path = directory / DIGESTS
    if not path.exists():
        meta_path = directory / TRAIN_META
        if meta_path.exists() and "digests" in train_meta(meta_path):
            raise CheckpointError(
                f"{path} is missing, but {meta_path} records that the checkpoint was sealed with "
                "it: the checkpoint is damaged or incomplete"
            )
        return None
    data, raw = read_json(path, "digest file")
    if data.get("format") != DIGESTS_FORMAT or data.get("version") != 1:
        raise CheckpointError(
            f"{path} is not a microadam_dist digest file this version knows (format "
            f"{data.get('format')!r}, version {data.get('version')!r})"
        )
    check_seal(path, data, raw, "digests_sha256", "digest file")
    files = validated(path, DIGESTS_SCHEMA, data, "digests")["files"]
    for rel, info in files.items():
        validated(path, relative_path, rel, "digests.files")
        f = directory / rel
        if not f.is_file():
            raise CheckpointError(f"{f} is missing: the checkpoint is incomplete (it is listed in {path})")
        size = f.stat().st_size
        if size != info["bytes"]:
            raise CheckpointError(
                f"{f} has {size} bytes, {path} says {info['bytes']}: the file is truncated, extended or was replaced"
            )
        if size <= _SMALL_FILE and sha256_of(f) != info["sha256"]:
            raise CheckpointError(f"{f}: SHA-256 differs from {path}: the file is corrupted")
    return files


def digest_problems(directory: Path, files: dict) -> list[str]:
    """Every listed file whose SHA-256 differs from its digest (the deep check of ``verify``)."""
    problems = []
    for rel, info in files.items():
        try:
            if sha256_of(directory / rel) != info["sha256"]:
                problems.append(f"{directory / rel}: SHA-256 differs from {DIGESTS} (corrupted)")
        except OSError as e:
            problems.append(f"{directory / rel} cannot be read ({e})")
    return problems


def check_groups(path: Path, groups: list[dict]) -> None:
    """The hyperparameters a DCP or DeepSpeed checkpoint holds, by MicroAdam's own rules."""
    for i, g in enumerate(groups):
        plain = {k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()}
        validated(path, hyperparameters, plain, f"optimizer parameter group {i}")


# ---- the formats' own checksums --------------------------------------------------------------------
class FileSlice(io.RawIOBase):
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


def zip_problem(fileobj) -> str | None:
    """Whether a torch.save archive reads back with every record's CRC-32 intact (None: it does)."""
    try:
        with zipfile.ZipFile(fileobj) as z:
            bad = z.testzip()
    except (
        zipfile.BadZipFile,
        zipfile.LargeZipFile,
        OSError,
        ValueError,
        EOFError,
        KeyError,
        NotImplementedError,
        RuntimeError,
        OverflowError,
    ) as e:
        return f"not a readable torch.save archive ({type(e).__name__}: {e})"
    return None if bad is None else f"record {bad!r} fails its CRC-32 (corrupted)"
