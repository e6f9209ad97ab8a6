"""Safetensors files written and read as streams.

The format (an 8-byte header length, a JSON header of dtypes, shapes and byte offsets, then the
raw data) lets a writer that knows every tensor's shape up front emit the header first and the
tensors one at a time (:class:`ShardWriter`), and a reader seek to one tensor
(:func:`read_safetensors_tensor`). The safetensors library holds a whole file in memory to write
and memory-maps to read, which would make a conversion's resident memory grow with the checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import torch

from .base import CheckpointError
from .schema import SchemaError, integer, list_of, mapping, no_duplicate_keys, optional, record, string, validated

ST_DTYPES = {
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.int16: "I16",
    torch.uint8: "U8",
    torch.int64: "I64",
    torch.float16: "F16",
    torch.int32: "I32",
    torch.float64: "F64",
}
ST_FROM = {v: k for k, v in ST_DTYPES.items()}


def byte_view(t: torch.Tensor):
    return t.reshape(-1).view(torch.uint8).numpy()


def _entry(v, where):
    """One tensor of a header: a known dtype, a shape, and exactly the bytes they need."""
    entry = record(
        {"dtype": string("|".join(ST_FROM)), "shape": list_of(integer(0)), "data_offsets": list_of(integer(0), 2)}
    )(v, where)
    begin, end = entry["data_offsets"]
    if end < begin or (end - begin) != math.prod(entry["shape"]) * ST_FROM[entry["dtype"]].itemsize:
        raise SchemaError(f"{where} has {end - begin} bytes for {entry['dtype']} {entry['shape']}")
    return entry


def read_safetensors_header(path: Path) -> dict:
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or 8 + n > size:
                raise ValueError(f"header length {n} does not fit in {size} bytes")
            header = json.loads(f.read(n), object_pairs_hook=no_duplicate_keys)
    except (ValueError, UnicodeDecodeError, RecursionError, OSError) as e:
        raise CheckpointError(f"{path} cannot be read as safetensors ({e}): the file is corrupted") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} cannot be read as safetensors (its header is not an object): corrupted")
    metadata = header.pop("__metadata__", None)
    validated(path, optional(mapping(string())), metadata, "safetensors __metadata__")
    header = validated(path, mapping(_entry), header, "safetensors header")
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
    t = torch.empty(info["shape"], dtype=ST_FROM[info["dtype"]])  # sizes checked with the header
    try:
        with open(path, "rb") as f:
            f.seek(header["__data_start__"] + begin)
            if t.numel() and f.readinto(byte_view(t)) != end - begin:
                raise CheckpointError(f"{path} is truncated inside tensor {key!r}")
    except OSError as e:
        raise CheckpointError(f"{path} cannot be read ({e})") from e
    return t


class ShardWriter:
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
            self.layout[-1].extend(
                (key, shape, dtype, math.prod(shape) * dtype.itemsize) for key, shape, dtype in group
            )
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
            header[key] = {"dtype": ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
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
            raise CheckpointError(
                f"internal: expected {want_key} {tuple(shape)} {dtype}, got {key} {tuple(tensor.shape)} {tensor.dtype}"
            )
        if tensor.numel():
            self._emit(memoryview(byte_view(tensor.detach().cpu().contiguous())))
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
