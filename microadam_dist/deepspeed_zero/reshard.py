"""Reshard a MicroAdam DeepSpeed ZeRO checkpoint into DeepSpeed's own layout for another world size.

DeepSpeed checks its partitioning on load (flat buffers, alignment paddings, ZeRO-3's per-parameter
slices), so the layout is made by DeepSpeed itself: ``world_size`` CPU processes (gloo) build an
engine over a stand-in module with the checkpoint's parameter names, shapes and groups and its saved
DeepSpeed config, load the state cut for their rank (``deepspeed_zero.load_canonical``) and call
``engine.save_checkpoint``. The model-states files are then the source's (module weights, LR
scheduler, step counters, client state) with the new data-parallel size, and the files beside the
checkpoint (a Trainer's ``trainer_state.json``, RNG states, ...) are copied along.

Memory: each helper process holds its rank's share of the state and, under ZeRO-1/2, the whole
model's weights, as a training rank would.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from ..checkpoint import DIGESTS, CheckpointError, DeepSpeedCheckpoint, atomic_directory, seal

#: config entries the stand-in engine must not take from the saved config
_DROPPED = ("optimizer", "scheduler", "train_batch_size")


def _source(path: Path) -> tuple[Path | None, Path]:
    """(root holding ``latest`` and the sibling files, or None; the tag directory)."""
    if (path / "latest").is_file():
        return path, path / (path / "latest").read_text().strip()
    return None, path


def _model_states(tag_dir: Path) -> dict:
    files = sorted(tag_dir.glob("*model_states.pt"))  # ZeRO-3: one per rank, the same but for its module shard
    if not files:
        raise CheckpointError(f"{tag_dir} has no *model_states.pt: the DeepSpeed checkpoint is incomplete")
    return torch.load(files[0], map_location="cpu", weights_only=False)


def reshard_deepspeed(src, out, world_size: int, *, overwrite: bool = False) -> Path:
    """Write the DeepSpeed checkpoint ``src`` (a save directory with ``latest``, or a tag directory)
    to ``out`` as DeepSpeed writes it at ``world_size`` ranks: ``out/latest``, ``out/<tag>/``."""
    import torch.multiprocessing as mp

    from ..distributed import free_port

    src = Path(src)
    root, tag_dir = _source(src)
    ckpt = DeepSpeedCheckpoint(tag_dir)  # refuses what is not a complete MicroAdam ZeRO checkpoint
    saved = _model_states(tag_dir)
    if not isinstance(saved.get("ds_config"), dict):
        raise CheckpointError(
            f"{tag_dir}: the model-states file records no DeepSpeed config (ds_config); "
            "convert it with `microadam-ckpt convert --to deepspeed` instead"
        )
    stage = int(saved["ds_config"].get("zero_optimization", {}).get("stage", 0))
    with atomic_directory(out, overwrite) as tmp:
        mp.start_processes(
            _worker,
            args=(world_size, free_port(), str(tag_dir), str(tmp)),
            nprocs=world_size,
            join=True,
            start_method="spawn",
        )
        new_tag = tmp / tag_dir.name
        for f in new_tag.glob("*model_states.pt"):  # the source's, at the new size
            f.unlink()
        states = {**saved, "dp_world_size": world_size}
        names = (
            [f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(world_size)]
            if stage == 3
            else ["mp_rank_00_model_states.pt"]
        )
        for name in names:
            torch.save(states, new_tag / name)
        if root is not None:
            for item in root.iterdir():  # trainer_state.json, rng_state_*.pth, zero_to_fp32.py, ...
                if item.name in ("latest", DIGESTS) or item.resolve() == tag_dir.resolve():
                    continue  # the source's seal lists the source's files: the output gets its own
                if item.is_dir():
                    if not (tmp / item.name).exists():
                        shutil.copytree(item, tmp / item.name)
                else:
                    shutil.copy2(item, tmp / item.name)
        (tmp / "latest").write_text(tag_dir.name)
        seal(tmp)  # every file's SHA-256 (microadam-ckpt inspect --verify), written last
    ckpt.close()
    return Path(out)


class _StandIn(torch.nn.Module):
    """Parameters of the given names (dotted paths) and shapes, in that order."""

    def __init__(self, shapes: dict[str, tuple]):
        super().__init__()
        for name, shape in shapes.items():
            *path, leaf = name.split(".")
            module = self
            for part in path:
                if part not in module._modules:
                    module.add_module(part, torch.nn.Module())
                module = module._modules[part]
            module.register_parameter(leaf, torch.nn.Parameter(torch.zeros(shape)))


def _order(ckpt: DeepSpeedCheckpoint) -> list[str]:
    """Parameter names in DeepSpeed's order: by their (group, index in group) keys."""
    keys = ckpt.zero_keys()
    return sorted(keys, key=keys.get)


def _worker(rank: int, world: int, port: int, tag_dir: str, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        DS_ACCELERATOR="cpu",
        CUDA_VISIBLE_DEVICES="",
    )
    torch.set_num_threads(1)
    import deepspeed
    import torch.distributed as dist

    from . import DeepSpeedMicroAdam, attach, load_canonical, skip_cpu_shm_build

    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        skip_cpu_shm_build()
        ckpt = DeepSpeedCheckpoint(Path(tag_dir))
        saved = _model_states(Path(tag_dir))
        names = _order(ckpt)
        model = _StandIn({n: ckpt.params[n].shape for n in names})
        params = dict(model.named_parameters())
        groups = []
        for g, hyper in enumerate(ckpt.groups):
            groups.append(
                {
                    "params": [params[n] for n in names if ckpt.params[n].group == g],
                    **{k: (tuple(v) if k == "betas" else v) for k, v in hyper.items()},
                }
            )
        cfg = {k: v for k, v in saved["ds_config"].items() if k not in _DROPPED}
        cfg["zero_allow_untested_optimizer"] = True
        if (cfg.get("zero_optimization", {}).get("offload_optimizer") or {}).get("device", "none") != "none":
            cfg["zero_force_ds_cpu_optimizer"] = False
        optimizer = DeepSpeedMicroAdam(groups, **{k: v for k, v in groups[0].items() if k != "params"})
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=cfg)
        attach(engine)
        load_canonical(engine, ckpt)
        engine.global_steps = int(saved.get("global_steps", 0))
        engine.save_checkpoint(out, tag=Path(tag_dir).name)
        dist.barrier()
    finally:
        dist.destroy_process_group()
