"""MicroAdam checkpoints: the canonical form, and reading the engines' checkpoints into it.

The canonical form (docs/design.md, section 10) is world-size free: per parameter, keyed by its
fully qualified name, the fp32 weight and the optimizer state in row form
(``functional.canonical_shapes``). On disk it is a directory:

    microadam-checkpoint.json   manifest: format, version, step, hyperparameters, parameters,
                                and the size and SHA-256 of every data file (written last)
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
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import json
import math
import os
import re
import shutil
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
FORMAT_VERSION = 1
MANIFEST = "microadam-checkpoint.json"
FIELDS = ("step", "window_idx", "window_val", "ef_codes", "ef_stats")
GEOMETRY_KEYS = ("window_size", "density", "block_size", "quant_bucket_size")
HYPER_KEYS = ("lr", "betas", "eps", "weight_decay", "alpha", *GEOMETRY_KEYS)
HYPER_DEFAULTS = {"alpha": 0.0}  # what a checkpoint saved before the key existed means
DEFAULT_SHARD_BYTES = 1 << 30


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit: the message names the problem and the fix."""


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
        """Deep integrity check (hashes, where the format has them); the problems found."""
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
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{manifest_path} is not valid JSON ({e}): the checkpoint is corrupted") from e
        if manifest.get("format") != FORMAT:
            raise CheckpointError(f"{manifest_path} is not a MicroAdam canonical manifest (format "
                                  f"{manifest.get('format')!r})")
        if manifest.get("version") != FORMAT_VERSION:
            raise CheckpointError(f"{manifest_path}: format version {manifest.get('version')} is not supported by "
                                  f"this microadam_dist (version {FORMAT_VERSION}); upgrade microadam_dist")
        self.manifest = manifest
        self.step = manifest.get("step")
        self.world_size = manifest.get("world_size")
        self.groups = [dict(g) for g in manifest["param_groups"]]
        self.params = {name: ParamEntry(name, tuple(p["shape"]), p["group"]) for name, p in manifest["params"].items()}
        self._files = {}
        for fname, info in manifest["files"].items():
            fpath = self.path / fname
            if not fpath.exists():
                raise CheckpointError(f"{fpath} is missing: the checkpoint is incomplete")
            size = fpath.stat().st_size
            if size != info["bytes"]:
                raise CheckpointError(f"{fpath} has {size} bytes, the manifest says {info['bytes']}: the file is "
                                      "truncated or was replaced")
        self._handles: dict[str, Any] = {}
        self._where = {name: p.get("files", {}) for name, p in manifest["params"].items()}

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
        return None if fname is None else self._get(fname, name)

    def state(self, name):
        fname = self._where[name].get("state")
        if fname is None:
            return None
        return {key: self._get(fname, f"{name}/{key}") for key in FIELDS}

    def verify(self) -> list[str]:
        problems = []
        for fname, info in self.manifest["files"].items():
            if sha256_of(self.path / fname) != info["sha256"]:
                problems.append(f"{fname}: SHA-256 differs from the manifest (corrupted)")
        return problems

    def close(self):
        self._handles.clear()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---- DCP (FSDP2) ----------------------------------------------------------------------------------
class DCPCheckpoint(Checkpoint):
    """A DCP checkpoint in ``microadam_dist.train``'s layout (``{"model": ..., "optim": ...}`` as
    produced by ``torch.distributed.checkpoint.state_dict.get_state_dict``), read one tensor at a time."""

    kind = "dcp"

    def __init__(self, path: Path):
        super().__init__(path)
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

        try:
            self._meta = FileSystemReader(str(self.path)).read_metadata()
        except Exception as e:  # noqa: BLE001 (pickle, EOF, ...: all mean the same to the user)
            raise CheckpointError(f"{self.path / '.metadata'} cannot be read ({type(e).__name__}: {e}): the DCP "
                                  "checkpoint is truncated or corrupted") from e
        md = self._meta.state_dict_metadata
        for fname in {item.relative_path for item in self._meta.storage_data.values()}:
            if not (self.path / fname).exists():
                raise CheckpointError(f"{self.path / fname} is missing: the DCP checkpoint is incomplete")
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
        meta_file = self.path / "train_meta.json"
        steps = []
        if meta_file.exists():
            self.step = json.loads(meta_file.read_text()).get("step")
        else:
            steps = [int(v) for v in self._load({k for k in self._tensors if k.endswith(".step")}).values()]
            self.step = max(steps, default=0)

    def _load(self, keys: set[str]) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

        if not keys:
            return {}
        try:
            with warnings.catch_warnings():  # "torch.distributed is unavailable": reading offline is the point
                warnings.simplefilter("ignore", UserWarning)
                flat = _load_state_dict_from_keys(keys, checkpoint_id=str(self.path))
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{self.path}: reading {sorted(keys)[:3]} failed ({type(e).__name__}: {e}): the "
                                  "DCP checkpoint is truncated or corrupted") from e
        return {key: _lookup(flat, key) for key in keys}

    def has_state(self, name):
        return f"optim.state.{name}.step" in self._tensors

    def weight(self, name):
        return self._load({f"model.{name}"})[f"model.{name}"]

    def state(self, name):
        keys = {f"optim.state.{name}.{key}" for key in FIELDS}
        present = keys & set(self._tensors)
        if not present:
            return None
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
        tag_dir = self.path
        if (self.path / "latest").exists():
            tag_dir = self.path / (self.path / "latest").read_text().strip()
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
        models = sorted(tag_dir.glob("*model_states.pt"))
        if models:
            model_sd = torch.load(models[0], map_location="cpu", mmap=True, weights_only=False)
            self.step = model_sd.get("global_steps")

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
@contextlib.contextmanager
def atomic_directory(out, overwrite: bool = False) -> Iterator[Path]:
    """A temporary directory beside ``out``, renamed to ``out`` when the block completes.

    On an error the temporary directory is removed and ``out`` is untouched; an existing ``out``
    is refused unless ``overwrite`` (then replaced only after the new one is complete).
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} exists; choose another output or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{os.getpid()}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            old = out.parent / f".{out.name}.{os.getpid()}.old"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
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


def read_safetensors_header(path: Path) -> dict:
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or 8 + n > size:
                raise ValueError(f"header length {n} does not fit in {size} bytes")
            header = json.loads(f.read(n))
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} cannot be read as safetensors ({e}): the file is corrupted") from e
    header.pop("__metadata__", None)
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
    t = torch.empty(info["shape"], dtype=_ST_FROM[info["dtype"]])
    if t.numel() * t.element_size() != end - begin:
        raise CheckpointError(f"{path}: tensor {key!r} has {end - begin} bytes for shape {info['shape']}: corrupted")
    with open(path, "rb") as f:
        f.seek(header["__data_start__"] + begin)
        if t.numel() and f.readinto(_byte_view(t)) != end - begin:
            raise CheckpointError(f"{path} is truncated inside tensor {key!r}")
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
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return Path(out)


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
        (tmp / "train_meta.json").write_text(json.dumps(
            {"step": ckpt.step or 0, "losses": [], "history": [], "converted_from": str(ckpt.path)}))
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
        cfg = StepConfig(lr=group["lr"], beta1=b1, beta2=b2, eps=group["eps"], weight_decay=group["weight_decay"],
                         window_size=group["window_size"], step=t)
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
