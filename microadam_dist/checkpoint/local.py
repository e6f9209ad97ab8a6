"""One process: save a model with its MicroAdam as a canonical checkpoint, and load any checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

from ..hyperparams import HYPER_DEFAULTS, HYPER_KEYS
from ..state import StateLayout
from .base import (
    Checkpoint,
    CheckpointError,
    ParamEntry,
    apply_saved_hyperparameters,
    canonical_parameter,
    check_compatible,
    load_scheduler,
    progress_bar,
)
from .canonical import write_canonical
from .readers import open_checkpoint


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
    """A single-process model and its MicroAdam, read as a checkpoint (what :func:`save` writes)."""

    kind = "single"

    def __init__(self, model, opt, lr_scheduler=None):
        super().__init__(Path("<memory>"))
        self.lr_scheduler = None if lr_scheduler is None else lr_scheduler.state_dict()
        self._params, group_of = _named(model, opt)
        self.groups = [
            {k: (tuple(g[k]) if k == "betas" else g.get(k, HYPER_DEFAULTS.get(k))) for k in HYPER_KEYS}
            for g in opt.param_groups
        ]
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
        return {k: v.cpu() for k, v in self.layout(name).to_rows(st).items()}


def save(model, opt, out, *, lr_scheduler=None, overwrite: bool = True, progress: bool = False) -> Path:
    """Save a single-process model and its MicroAdam (and the LR scheduler's state, when given) as a
    canonical checkpoint."""
    live = _LiveCheckpoint(model, opt, lr_scheduler)
    return write_canonical(live, out, world_size=1, overwrite=overwrite, progress=progress)


def load(model, opt, path, *, lr_scheduler=None, progress: bool = False) -> Checkpoint:
    """Load any checkpoint (canonical, DCP, DeepSpeed) into a single-process model and its MicroAdam,
    and into ``lr_scheduler`` the schedule's state the checkpoint records (a warning when it records
    none: the schedule then starts afresh). The saved lr, betas, eps, weight_decay and alpha replace
    the optimizer's, as ``Optimizer.load_state_dict`` does.

    Refuses a checkpoint of another model (missing, extra or reshaped parameters are named) or
    another MicroAdam geometry before anything is changed.
    """
    ckpt = path if isinstance(path, Checkpoint) else open_checkpoint(path)
    params, group_of = _named(model, opt)
    check_compatible(
        ckpt,
        {n: tuple(p.shape) for n, p in params.items()},
        {n: opt.param_groups[group_of[id(p)]] for n, p in params.items()},
    )
    loaded = {}
    for name in progress_bar(params, len(params), "load", progress):  # read everything before touching the model
        loaded[name] = canonical_parameter(ckpt, name)
    with torch.no_grad():
        for name, p in params.items():
            weight, st = loaded[name]
            if weight is not None:
                p.copy_(weight.to(p.dtype))
            if st is None:
                opt.state.pop(p, None)
                continue
            layout = StateLayout(ckpt.geometry(name), opt.param_groups[group_of[id(p)]]["window_size"])
            opt.state[p] = layout.install(layout.from_rows(st), p.device)
    if len(ckpt.groups) == len(opt.param_groups):
        apply_saved_hyperparameters(opt.param_groups, ckpt.groups)
    load_scheduler(ckpt, lr_scheduler)
    return ckpt
