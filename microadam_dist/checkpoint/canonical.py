"""The canonical checkpoint: MicroAdam's world-size-free directory format, its reader and writer.

Per parameter, keyed by its fully qualified name, the fp32 weight and the optimizer state in row
form (``state.StateLayout.row_shapes``). On disk it is a directory:

    microadam-checkpoint.json   manifest: format, version, step, hyperparameters, parameters,
                                the size and SHA-256 of every data file, and last the SHA-256
                                of the manifest itself (written last)
    weights-00001.safetensors   "<name>": fp32 weights
    state-00001.safetensors     "<name>/step|window_idx|window_val|ef_codes|ef_stats"

A version-1 manifest (without its own SHA-256) is still read; ``unverified`` says so.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from ..hyperparams import HYPER_DEFAULTS
from ..state import DTYPES, FIELDS
from .atomic import atomic_directory, write_synced
from .base import Checkpoint, CheckpointError, ParamEntry, canonical_parameter, progress_bar, scheduler_json
from .integrity import sha256_of
from .safetensors_io import ShardWriter, read_safetensors_header, read_safetensors_tensor
from .schema import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    MANIFEST_DIGEST,
    MANIFESTS,
    check_seal,
    read_json,
    record,
    sealed_json,
    validated,
)

DEFAULT_SHARD_BYTES = 1 << 30


class CanonicalCheckpoint(Checkpoint):
    kind = "canonical"

    def __init__(self, path: Path):
        super().__init__(path)
        manifest_path = self.path / MANIFEST
        manifest, raw = read_json(manifest_path, "manifest")
        if manifest.get("format") != FORMAT:
            raise CheckpointError(
                f"{manifest_path} is not a MicroAdam canonical manifest (format {manifest.get('format')!r})"
            )
        version = manifest.get("version")
        if version not in MANIFESTS:
            raise CheckpointError(
                f"{manifest_path}: format version {version!r} is not supported by this "
                f"microadam_dist (versions {sorted(MANIFESTS)}); upgrade microadam_dist"
            )
        self.sealed = version >= 2  # version 1 manifests carry no digest of themselves
        if self.sealed:  # before the schema: a damaged manifest is reported as damaged, whatever changed
            check_seal(manifest_path, manifest, raw, MANIFEST_DIGEST, "manifest")
        manifest = validated(manifest_path, record(MANIFESTS[version]), manifest, "manifest")
        self.manifest = manifest
        self.step = manifest["step"]
        self.lr_scheduler = manifest.get("lr_scheduler")
        self.world_size = manifest["world_size"]
        self.groups = [
            {**HYPER_DEFAULTS, **{k: (tuple(v) if k == "betas" else v) for k, v in g.items()}}
            for g in manifest["param_groups"]
        ]  # keys added since a manifest was written: defaults
        self.params = {}
        for name, p in manifest["params"].items():
            if p["group"] >= len(self.groups):
                raise CheckpointError(
                    f"{manifest_path}: parameter {name!r} is in group {p['group']}, the manifest "
                    f"has {len(self.groups)} groups: the manifest is corrupted"
                )
            for part, fname in p["files"].items():
                if fname not in manifest["files"]:
                    raise CheckpointError(
                        f"{manifest_path}: the {part} of parameter {name!r} is in {fname}, which "
                        "the manifest does not list: the manifest is corrupted"
                    )
            self.params[name] = ParamEntry(name, tuple(p["shape"]), p["group"])
        for fname, info in manifest["files"].items():
            fpath = self.path / fname
            try:
                size = fpath.stat().st_size
            except FileNotFoundError:
                raise CheckpointError(f"{fpath} is missing: the checkpoint is incomplete") from None
            if size != info["bytes"]:
                raise CheckpointError(
                    f"{fpath} has {size} bytes, the manifest says {info['bytes']}: the file is "
                    "truncated or was replaced"
                )
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
            raise CheckpointError(
                f"{self.path / fname}: weight {name!r} is {weight.dtype}, canonical weights are "
                "torch.float32: the file is corrupted or was written by another tool"
            )
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
        return [
            f"{self.path / MANIFEST}: unverified manifest (format version 1 records no digest of itself, so a "
            "changed hyperparameter or name in it cannot be detected; the data files' digests are checked). "
            "Rewrite it with `microadam-ckpt convert DIR NEW --to single` to add one"
        ]

    def close(self):
        self._handles.clear()


def write_canonical(
    ckpt: Checkpoint,
    out,
    *,
    world_size: int | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
    progress: bool = True,
    note: str | None = None,
) -> Path:
    """Write ``ckpt`` as a canonical directory (``world_size``: the intended one, recorded only)."""
    started = time.time()
    names = list(ckpt.params)
    with atomic_directory(out, overwrite) as tmp:
        weights, states = ShardWriter(tmp, "weights", shard_bytes), ShardWriter(tmp, "state", shard_bytes)
        # what each parameter holds is known before any data is read (weights: all or none)
        has_weight = ckpt.has_weights()
        has_state = {name: ckpt.has_state(name) for name in names}
        weight_files = weights.plan([[(n, ckpt.params[n].shape, torch.float32)] for n in names] if has_weight else [])
        state_shapes = {n: ckpt.layout(n).row_shapes() for n in names if has_state[n]}
        state_files = iter(
            states.plan([[(f"{n}/{k}", state_shapes[n][k], DTYPES[k]) for k in FIELDS] for n in names if has_state[n]])
        )
        params = {}
        for i, name in enumerate(progress_bar(names, len(names), "canonical", progress)):
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
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "source": {"kind": ckpt.kind, "path": str(ckpt.path), "world_size": ckpt.world_size},
            "world_size": world_size,
            "note": note,
            "step": ckpt.step,
            "lr_scheduler": scheduler_json(ckpt),
            "param_groups": [_jsonable(g) for g in ckpt.groups],
            "params": params,
            "files": {**weights.files, **states.files},
        }
        write_synced(tmp / MANIFEST, sealed_json(manifest, MANIFEST_DIGEST))
    return Path(out)


def _jsonable(group: dict) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items()}
