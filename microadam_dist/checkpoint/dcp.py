"""DCP checkpoints of FSDP2: the reader, and a writer FSDP2 loads at any world size.

The layout is ``microadam_dist.train``'s: ``{"model": ..., "optim": ...}`` as
``torch.distributed.checkpoint.state_dict.get_state_dict`` produces it, which DCP flattens to
``model.<name>``, ``optim.state.<name>.<field>`` and ``optim.param_groups.<g>.<key>``. Both read
and write one tensor at a time.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import torch

from ..hyperparams import GEOMETRY_KEYS, HYPER_DEFAULTS, HYPER_KEYS
from ..state import DTYPES, FIELDS, narrow_indices
from .atomic import atomic_directory
from .base import Checkpoint, CheckpointError, ParamEntry, checked_weight, damaged, progress_bar, scheduler_json
from .integrity import (
    DIGESTS,
    TRAIN_META,
    FileSlice,
    check_groups,
    digest_problems,
    read_digests,
    seal,
    train_meta,
    zip_problem,
)


class DCPCheckpoint(Checkpoint):
    """A DCP checkpoint in ``microadam_dist.train``'s layout (``{"model": ..., "optim": ...}`` as
    produced by ``torch.distributed.checkpoint.state_dict.get_state_dict``), read one tensor at a time."""

    kind = "dcp"

    def __init__(self, path: Path):
        super().__init__(path)
        self._digests = read_digests(self.path)
        with damaged(self.path, "the DCP checkpoint is damaged or truncated"):
            self._open()
        check_groups(self.path, self.groups)

    def _open(self) -> None:
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

        try:
            self._meta = FileSystemReader(str(self.path)).read_metadata()
        except Exception as e:  # noqa: BLE001 (pickle, EOF, ...: all mean the same to the user)
            raise CheckpointError(
                f"{self.path / '.metadata'} cannot be read ({type(e).__name__}: {e}): the DCP "
                "checkpoint is truncated or corrupted"
            ) from e
        md = self._meta.state_dict_metadata
        self._items: dict[str, list] = {}  # data file -> [(offset, length, transformed)] of its items
        for item in self._meta.storage_data.values():
            self._items.setdefault(item.relative_path, []).append(
                (item.offset, item.length, bool(getattr(item, "transform_descriptors", None)))
            )
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
            raise CheckpointError(
                f"{self.path} has no optimizer parameter groups (optim.param_groups.*): not a "
                "checkpoint of an optimizer saved with get_state_dict"
            )
        values = self._load({k for k in byte_keys if k.startswith("optim.param_groups.")})
        state_fields = {k.rsplit(".", 1)[1] for k in self._tensors if k.startswith("optim.state.")}
        if not set(FIELDS) & state_fields and state_fields:
            raise CheckpointError(
                f"{self.path} holds the state of another optimizer (fields {sorted(state_fields)}), not MicroAdam's"
            )
        for g in group_keys:
            group = {key: values.get(f"optim.param_groups.{g}.{key}", HYPER_DEFAULTS.get(key)) for key in HYPER_KEYS}
            missing = [key for key in GEOMETRY_KEYS if group[key] is None]
            if missing:
                raise CheckpointError(
                    f"{self.path} holds the state of another optimizer: its parameter group {g} "
                    f"has no {missing} (MicroAdam's geometry)"
                )
            self.groups.append(group)
            for name in values[f"optim.param_groups.{g}.params"]:
                key = f"model.{name}"
                if key not in self._tensors:
                    raise CheckpointError(
                        f"{self.path}: parameter {name!r} of the optimizer has no model.{name} weight"
                    )
                self.params[name] = ParamEntry(name, tuple(self._tensors[key].size), g)
        meta_file = self.path / TRAIN_META
        steps = []
        if meta_file.exists():
            meta = train_meta(meta_file)
            self.step = meta.get("step")
            scheduler = meta.get("lr_scheduler")
            self.lr_scheduler = scheduler if isinstance(scheduler, dict) else None
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
            raise CheckpointError(
                f"{self.path}: reading {sorted(keys)[:3]} failed ({type(e).__name__}: {e}): the "
                "DCP checkpoint is truncated or corrupted"
            ) from e
        return {key: _lookup(flat, key) for key in keys}

    def has_state(self, name):
        return f"optim.state.{name}.step" in self._tensors

    def weight(self, name):
        with damaged(self.path, "the DCP checkpoint is damaged"):
            weight = self._load({f"model.{name}"})[f"model.{name}"]
        if not isinstance(weight, torch.Tensor):
            raise CheckpointError(f"{self.path}: model.{name} is not a tensor: the DCP checkpoint is damaged")
        return weight

    def verify(self) -> list[str]:
        if self._digests is not None:
            return digest_problems(self.path, self._digests)
        problems = []  # no digests: what the format itself can tell
        for fname, items in sorted(self._items.items()):
            fpath, end = self.path / fname, max(o + n for o, n, _ in items)
            if fpath.stat().st_size != end:
                problems.append(
                    f"{fpath} has {fpath.stat().st_size - end} bytes after its last item (appended or overwritten)"
                )
            with open(fpath, "rb") as f:  # every item is a torch.save archive: check its CRC-32s
                for offset, length, transformed in items:
                    if not transformed:
                        problem = zip_problem(FileSlice(f, offset, length))
                        if problem:
                            problems.append(f"{fpath} at byte {offset}: {problem}")
        return problems

    def unverified(self) -> list[str]:
        if self._digests is not None:
            return []
        return [
            f"{self.path}: no {DIGESTS} (not written by microadam_dist, or by a version before digests): the "
            "data items' CRC-32s were checked, but .metadata and the files' layout have no checksum"
        ]

    def state(self, name):
        keys = {f"optim.state.{name}.{key}" for key in FIELDS}
        present = keys & set(self._tensors)
        if not present:
            return None
        with damaged(self.path, "the DCP checkpoint is damaged"):
            values = self._load(present)
            # a missing field is left out: the state check names it; FSDP2 exports window indices as int32
            return narrow_indices(
                {key: values[f"optim.state.{name}.{key}"] for key in FIELDS if f"optim.state.{name}.{key}" in values}
            )


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
        optim_state[name] = {}
        for key, shape in ckpt.layout(name).row_shapes().items():
            optim_state[name][key] = torch.empty(shape, dtype=DTYPES[key], device="meta")
            loaders[f"optim.state.{name}.{key}"] = (name, key)
    param_groups = []
    for g, group in enumerate(ckpt.groups):
        param_groups.append(
            {
                **{key: (tuple(group[key]) if key == "betas" else group[key]) for key in HYPER_KEYS},
                "params": [n for n, e in ckpt.params.items() if e.group == g],
            }
        )
    nested = {"model": model, "optim": {"state": optim_state, "param_groups": param_groups}}
    missing_state = [n for n in ckpt.params if not ckpt.has_state(n)]
    if missing_state:
        raise CheckpointError(
            f"{ckpt.path}: parameters {missing_state[:5]} have no optimizer state yet (saved "
            "before the first step); DCP needs it: take a step first"
        )
    bar = progress_bar(None, len(loaders), "dcp", progress)
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
                cache["value"] = checked_weight(ckpt, name) if key is None else ckpt.checked_state(name)
            bar.update(1)
            value = cache["value"]
            if value is None:
                raise CheckpointError(f"{ckpt.path}: parameter {name!r} has no {part}; DCP needs one")
            return value if key is None else value[key]

    with atomic_directory(out, overwrite) as tmp:
        # a file per tensor: DCP keeps every tensor of a file in memory until the file is closed
        dcp.save(
            nested,
            storage_writer=dcp.FileSystemWriter(str(tmp), thread_count=1, single_file_per_rank=False),
            planner=LazyPlanner(),
            no_dist=True,
        )
        meta = {"step": ckpt.step or 0, "losses": [], "history": [], "converted_from": str(ckpt.path)}
        scheduler = scheduler_json(ckpt)
        if scheduler is not None:  # DCP's own files have no place for it: train_meta.json carries it
            meta["lr_scheduler"] = scheduler
        seal(tmp, meta)
    bar.close()
    return Path(out)
