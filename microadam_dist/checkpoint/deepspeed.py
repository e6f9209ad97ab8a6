"""The DeepSpeed ZeRO-1/2/3 checkpoint reader: MicroAdam's partition state mapped back to parameters.

It reads a checkpoint saved by ``engine.save_checkpoint`` with MicroAdam at any world size
through the layout schema the partition adapter writes (``zero_layout``): which slices of which
parameter each rank's partition holds, and their names. Each slice's state is a view into the
partition's packed state (``state.packed_views``); a parameter's slices are joined into its
row-form state. Nothing here imports the adapter.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import torch

from ..hyperparams import HYPER_DEFAULTS, HYPER_KEYS
from ..state import StateLayout, packed_views
from ..zero_layout import LAYOUT_KEY, MODEL_STATES, RANK_FILE, RANK_MODEL_STATES, ZeroSlice, saved_slices
from .base import Checkpoint, CheckpointError, ParamEntry, damaged
from .integrity import DIGESTS, check_groups, digest_problems, read_digests, zip_problem


class DeepSpeedCheckpoint(Checkpoint):
    """A DeepSpeed ZeRO-1/2/3 checkpoint written by ``engine.save_checkpoint`` with MicroAdam.

    Each rank's file holds its fp32 master partition(s) and MicroAdam's flat partition state with
    the layout MicroAdam adds (``zero_layout.LAYOUT_KEY``: which elements of which parameter sit
    where, and their names). Files are memory-mapped, so only what is read is loaded.
    """

    kind = "deepspeed"

    def __init__(self, path: Path):
        super().__init__(path)
        self._views: dict[tuple[int, int], list | None] = {}  # (rank, partition) -> _partition_state
        self._digests = read_digests(self.path)
        with damaged(self.path, "the DeepSpeed checkpoint is damaged or truncated"):
            self._open()
        check_groups(self.path, self.groups)

    def _open(self) -> None:
        tag_dir = self.path
        if (self.path / "latest").exists():
            tag = (self.path / "latest").read_text().strip()
            tag_dir = self.path / tag
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", tag) or not tag_dir.is_dir():
                raise CheckpointError(
                    f"{self.path / 'latest'} names the tag {tag!r}, which is not a directory in "
                    f"{self.path}: the file is damaged or the tag directory is missing"
                )
        self.tag_dir = tag_dir
        files = {int(m.group(1)): tag_dir / f for f in os.listdir(tag_dir) if (m := RANK_FILE.match(f))}
        if not files:
            raise CheckpointError(
                f"{tag_dir} holds no ZeRO optimizer files (*zero_pp_rank_*_optim_states.pt): "
                "not a DeepSpeed ZeRO-1/2/3 checkpoint"
            )
        self.world_size = max(files) + 1
        first = self.load_rank_file(files[min(files)])
        partitions = first[1].get("partitions", {}) if first[1] else {}
        if partitions:  # the world size each rank recorded, so a lost last rank is noticed too
            self.world_size = max(self.world_size, *(int(info["world_size"]) for info in partitions.values()))
        missing = sorted(set(range(self.world_size)) - set(files))
        if missing:
            raise CheckpointError(
                f"{tag_dir}: the optimizer files of ranks {missing} are missing: the checkpoint is incomplete"
            )
        self._slices: dict[str, list[tuple[int, int, ZeroSlice]]] = {}  # name -> [(rank, partition, slice)]
        self._ranks = []  # per rank: (its MicroAdam state per partition, its fp32 partitions)
        self._partitions: list[dict[int, tuple]] = []  # per rank: partition -> (slices, names) by offset
        group_of_index: dict[int, int] = {}
        for rank in range(self.world_size):
            base, layout, flats = first if rank == min(files) else self.load_rank_file(files[rank])
            if rank == 0:
                self.groups = [
                    {key: g.get(key, HYPER_DEFAULTS.get(key)) for key in HYPER_KEYS} for g in base["param_groups"]
                ]
                for gi, g in enumerate(base["param_groups"]):
                    for index in g["params"]:
                        group_of_index[index] = gi
            self._ranks.append((base["state"], list(flats)))
            self._partitions.append({})
            for index, info in layout["partitions"].items():
                if info["world_size"] != self.world_size or info["rank"] != rank:
                    raise CheckpointError(
                        f"{files[rank]} was written by rank {info['rank']} of "
                        f"{info['world_size']}, but sits among {self.world_size} rank files"
                    )
                slices, names = saved_slices(info), list(info["names"])
                for zslice, name in zip(slices, names):
                    if name is None:
                        raise CheckpointError(
                            f"{files[rank]}: parameter names were not recorded (MicroAdam was "
                            "given to DeepSpeed without attach(engine)); cannot map the state"
                        )
                    if name not in self.params:
                        self.params[name] = ParamEntry(name, zslice.shape, group_of_index[int(index)])
                    self._slices.setdefault(name, []).append((rank, int(index), zslice))
                # the packed state holds the slices in partition order: a layout listing them in another
                # order describes the same partition
                order = sorted(range(len(slices)), key=lambda j: slices[j].offset)
                self._partitions[rank][int(index)] = ([slices[j] for j in order], [names[j] for j in order])
        # DeepSpeed's own load needs the model states: one file, or one per rank under ZeRO-3
        models = [tag_dir / MODEL_STATES]
        if not models[0].exists():
            models = [tag_dir / RANK_MODEL_STATES.format(rank=r) for r in range(self.world_size)]
            lost = [m.name for m in models if not m.exists()]
            if lost:
                raise CheckpointError(
                    f"{tag_dir}: the model states {lost[:3]} are missing ({MODEL_STATES}, or one "
                    "per rank under ZeRO-3): the checkpoint is incomplete"
                )
        self._files = [*files.values(), *models]
        try:
            model_sd = torch.load(models[0], map_location="cpu", mmap=True, weights_only=False)
        except Exception as e:  # noqa: BLE001 (zip, pickle, EOF: all mean the same to the user)
            raise CheckpointError(
                f"{models[0]} cannot be loaded ({type(e).__name__}: {e}): the file is truncated or corrupted"
            ) from e
        step = model_sd.get("global_steps")
        if not (step is None or (isinstance(step, int) and step >= 0)):
            raise CheckpointError(f"{models[0]}: global_steps is {step!r}: the file is corrupted")
        self.step = step
        scheduler = model_sd.get("lr_scheduler")
        self.lr_scheduler = scheduler if isinstance(scheduler, dict) else None

    def zero_keys(self) -> dict[str, tuple[int, int]]:
        """Each parameter's ZeRO key (DeepSpeed group, index in that group): sorting by it gives
        DeepSpeed's parameter order."""
        return {name: slices[0][2].key for name, slices in self._slices.items()}

    def verify(self) -> list[str]:
        if self._digests is not None:
            return digest_problems(self.path, self._digests)
        problems = []
        for f in self._files:  # no digests: the CRC-32 of every record of each torch.save archive
            with open(f, "rb") as fh:
                problem = zip_problem(fh)
            if problem:
                problems.append(f"{f}: {problem}")
        return problems

    def unverified(self) -> list[str]:
        if self._digests is not None:
            return []
        return [
            f"{self.path}: no {DIGESTS} (saved by DeepSpeed directly, not through microadam_dist.train): every "
            "record's CRC-32 was checked, but bytes outside the records (zip headers, padding, appended data) and "
            "the tag in 'latest' have no checksum"
        ]

    @staticmethod
    def load_rank_file(path: Path):
        """(MicroAdam's state_dict, its ZeRO layout, the fp32 partitions) of one rank's file."""
        try:
            sd = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(
                f"{path} cannot be loaded ({type(e).__name__}: {e}): the file is truncated or corrupted"
            ) from e
        osd = sd.get("optimizer_state_dict", {})
        base = osd.get("base_optimizer_state", osd.get("optimizer_state_dict"))
        flats = osd.get("single_partition_of_fp32_groups", osd.get("fp32_flat_groups"))
        if not isinstance(base, dict) or flats is None:
            raise CheckpointError(
                f"{path} is not a ZeRO-1/2/3 optimizer file this tool knows (no base optimizer "
                "state or fp32 partitions); DeepSpeed's bf16 optimizer without ZeRO is not supported"
            )
        layout = base.get(LAYOUT_KEY)
        if layout is None:
            groups = base.get("param_groups", [{}])
            raise CheckpointError(
                f"{path} holds no MicroAdam state (optimizer hyperparameters "
                f"{sorted(k for k in groups[0] if k != 'params')}): it was saved with another "
                "optimizer"
            )
        return base, layout, flats

    def _partition_state(self, rank: int, index: int) -> list | None:
        """(name, StateLayout, flat state) of every slice of one partition, by offset: views
        into the memory-mapped file, built once per partition; None before the first step."""
        if (rank, index) not in self._views:
            packed = self._ranks[rank][0].get(index)
            if not packed:
                self._views[(rank, index)] = None
            else:
                slices, names = self._partitions[rank][index]
                layouts = [s.state_layout(self.groups[self.params[n].group]) for s, n in zip(slices, names)]
                self._views[(rank, index)] = list(zip(names, layouts, packed_views(layouts, packed)))
        return self._views[(rank, index)]

    def has_state(self, name):
        return all(self._ranks[rank][0].get(index) for rank, index, _ in self._slices[name])

    def weight(self, name):
        with damaged(self.tag_dir, "the DeepSpeed checkpoint is damaged"):
            return self._weight(name)

    def _weight(self, name):
        entry = self.params[name]
        out = torch.empty(math.prod(entry.shape), dtype=torch.float32)
        covered = 0
        for rank, index, zslice in self._slices[name]:
            start, numel, offset = zslice.start, zslice.numel, zslice.offset
            out[start : start + numel] = self._ranks[rank][1][index][offset : offset + numel]
            covered += numel
        if covered != out.numel():
            raise CheckpointError(
                f"{self.tag_dir}: parameter {name!r}: the rank files hold {covered} of its {out.numel()} elements"
            )
        return out.view(entry.shape)

    def state(self, name):
        with damaged(self.tag_dir, "the DeepSpeed checkpoint is damaged"):
            return self._state(name)

    def _state(self, name):
        blocks = []
        for rank, index in sorted({(r, i) for r, i, _ in self._slices[name]}):
            views = self._partition_state(rank, index)
            if views is None:
                return None  # saved before the first step
            for slice_name, layout, flat in views:
                if slice_name == name and not layout.is_empty:
                    blocks.append((layout.b0, layout.b1, flat))
        layout = self.layout(name)
        try:
            joined = StateLayout.join(layout.geometry, layout.window_size, blocks)
        except ValueError as e:
            raise CheckpointError(f"{self.tag_dir}: parameter {name!r}: {e}") from e
        return {k: v.clone() for k, v in joined.items()}
