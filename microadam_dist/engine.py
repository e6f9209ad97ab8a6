"""The engine seam: how MicroAdam reaches the parameters a training engine hands it.

An engine turns each param group into :class:`StepWork` units: a process group, the *segments*
(``sharded.Segment``: ranges of a parameter's global flat index) this rank holds, and their state.
``MicroAdam.step`` runs ``sharded.ShardedStepper`` on every unit, whatever the engine; the engine
also owns how its state is saved and loaded. Implementations:

* :class:`ParamsEngine` (the default): plain tensors (a whole parameter is one segment, stepped by
  this process alone) and FSDP2 DTensors (the local shard, through ``dtensor``);
* ``fsdp1.FSDP1Engine``: FSDP1 flat-parameter shards (``fsdp1.attach``);
* ``deepspeed_zero.partitions.ZeroEngine``: DeepSpeed ZeRO's flat fp32 partitions.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from .geometry import geometry_of
from .hyperparams import check_same_geometry
from .sharded import Segment
from .state import StateLayout, narrow_indices


def is_dtensor(t) -> bool:
    """Whether ``t`` is a DTensor, without importing ``torch.distributed.tensor`` when nothing has."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


@dataclass
class StepWork:
    """Segments stepped together: one process group's share of a param group."""

    key: Hashable  # caches the exchange plan of this unit (the same unit each step)
    process_group: Any  # None: the default group
    local: bool  # this process alone: no collectives
    segments: list[Segment]
    states: dict[Hashable, dict]  # flat state per segment key; missing or {} before the first step
    describe: Callable[[Hashable], str]  # names a skipped parameter in the warning
    finish: Callable[[], None] | None = None  # run once the step is applied (store new state, copy back)


class Engine(Protocol):
    """What an engine provides. ``segments`` is called by every rank in the same order."""

    def segments(self, optimizer, group_index: int, group: dict) -> list[StepWork]:
        """This step's units of work of one param group."""

    def state_dict(self, optimizer) -> dict:
        """``optimizer.state_dict()``: torch's layout, each parameter's state as the engine saves it."""

    def load_state_dict(self, optimizer, state_dict: dict) -> None:
        """Check and install a state_dict; nothing is changed unless everything fits."""


def install(optimizer, state_dict: dict, states: dict) -> None:
    """Load ``state_dict``'s hyperparameters through torch, then install ``states`` as they are.

    torch's ``Optimizer.load_state_dict`` would cast floating-point state to the parameter's dtype
    (bf16 window values to fp32, fp32 statistics to bf16), so the state goes around it.
    """
    torch.optim.Optimizer.load_state_dict(optimizer, {**state_dict, "state": {}})
    for group in optimizer.param_groups:  # a state_dict saved before alpha existed: no densification
        if group.get("alpha") is None:
            group["alpha"] = 0.0
    for p, st in states.items():
        optimizer.state[p] = st


def check_grad(p: torch.Tensor, grad: torch.Tensor) -> None:
    if grad.is_sparse:
        raise RuntimeError(
            "MicroAdam does not support sparse gradients; use dense gradients (for nn.Embedding, sparse=False)"
        )
    if grad.is_complex() or not grad.is_floating_point():
        raise RuntimeError(f"MicroAdam needs real floating-point gradients, got {grad.dtype}")
    if grad.shape != p.shape:
        raise RuntimeError(f"gradient shape {tuple(grad.shape)} does not match parameter shape {tuple(p.shape)}")
    if grad.device != p.device:
        raise RuntimeError(f"gradient on {grad.device} but parameter on {p.device}")


class ParamsEngine:
    """Parameters as torch holds them: plain tensors, and DTensors sharded on dim 0 (FSDP2, HSDP).

    State is ``optimizer.state[p]`` in flat form (of the local shard's owned blocks for a DTensor);
    ``state_dict`` exports it in row form (DTensors for DTensor parameters, for DCP).
    """

    def segments(self, optimizer, group_index: int, group: dict) -> list[StepWork]:
        local: list[tuple[Any, Segment]] = []
        sharded: dict[Any, list] = {}  # process group -> [(param, segment)]
        copy_back = []
        for index, p in enumerate(group["params"]):
            if p.numel() == 0:
                continue
            if p.grad is not None:
                check_grad(p, p.grad)
            key = (group_index, index)
            if is_dtensor(p):
                from . import dtensor

                seg, pg = dtensor.dtensor_segment(p, key, geometry_of(p.shape, group), group)
                sharded.setdefault(pg, []).append((p, seg))
            elif getattr(p, "_fsdp_flattened", False):
                raise RuntimeError(
                    "this parameter is an FSDP1 (FullyShardedDataParallel) shard: call "
                    "microadam_dist.fsdp1.attach(optimizer, model) once after building the optimizer"
                )
            elif p.grad is not None:
                flat = p.view(-1) if p.is_contiguous() else p.detach().reshape(-1).clone()
                if flat.data_ptr() != p.data_ptr():
                    copy_back.append((p, flat))
                local.append(
                    (
                        p,
                        Segment(
                            key=key,
                            geometry=geometry_of(p.shape, group),
                            start=0,
                            param=flat,
                            grad=p.grad.reshape(-1),
                            group=group,
                        ),
                    )
                )
        works = []
        if local:
            works.append(
                self._work(
                    optimizer,
                    (group_index, "local"),
                    None,
                    True,
                    local,
                    copy_back,
                    lambda key: f"parameter {key[1]} of group {key[0]} (shape {tuple(group['params'][key[1]].shape)})",
                )
            )
        for pg, items in sharded.items():
            works.append(
                self._work(
                    optimizer,
                    (group_index, pg),
                    pg,
                    False,
                    items,
                    [],
                    lambda key: f"parameter {key[1]} of group {key[0]}",
                )
            )
        return works

    @staticmethod
    def _work(optimizer, key, pg, local, items, copy_back, describe) -> StepWork:
        states = {seg.key: optimizer.state[p] for p, seg in items if optimizer.state.get(p)}

        def finish():
            for p, seg in items:  # state the step created (none for a skipped parameter)
                if states.get(seg.key) and not optimizer.state.get(p):
                    optimizer.state[p] = states[seg.key]
            for p, flat in copy_back:
                p.copy_(flat.view_as(p))

        return StepWork(key, pg, local, [seg for _, seg in items], states, describe, finish)

    def state_dict(self, optimizer) -> dict:
        sd = torch.optim.Optimizer.state_dict(optimizer)
        for index, (p, group) in enumerate(_indexed(optimizer)):
            if index in sd["state"] and not sd["state"][index]:  # an entry something read into being
                del sd["state"][index]
            elif index in sd["state"]:
                geometry, m = geometry_of(p.shape, group), group["window_size"]
                if is_dtensor(p):
                    from . import dtensor

                    sd["state"][index] = dtensor.export_state(p, sd["state"][index], geometry, m)
                else:
                    sd["state"][index] = StateLayout(geometry, m).to_rows(sd["state"][index])
        return sd

    def load_state_dict(self, optimizer, state_dict: dict) -> None:
        saved_groups = state_dict.get("param_groups")
        if saved_groups is None or "state" not in state_dict:
            raise ValueError("not an optimizer state_dict: it needs 'state' and 'param_groups'")
        check_same_geometry(saved_groups, optimizer.param_groups)
        by_id = {}
        for i, (saved, group) in enumerate(zip(saved_groups, optimizer.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"parameter group {i}: the state_dict has {len(saved['params'])} parameters, "
                    f"the optimizer {len(group['params'])}"
                )
            by_id.update(zip(saved["params"], [(p, group) for p in group["params"]]))
        unknown = [pid for pid in state_dict["state"] if pid not in by_id]
        if unknown:
            raise ValueError(f"the state_dict has state for unknown parameter id {unknown[0]!r}")
        states = {}
        for pid, st in state_dict["state"].items():  # every parameter checked before any is installed
            p, group = by_id[pid]
            layout = StateLayout(geometry_of(p.shape, group), group["window_size"])
            hint = f"the checkpoint belongs to a different model (parameter of shape {tuple(p.shape)})"
            if is_dtensor(p):
                from . import dtensor

                st = narrow_indices(st)
                layout.check(st, f"parameter {pid!r}", rows=True, hint=hint)
                states[p] = dtensor.import_state(p, st, layout.geometry, layout.window_size)
            else:
                layout.check(st, f"parameter {pid!r}", rows=True, hint=hint)
                states[p] = layout.from_rows(st)
            states[p] = layout.install(states[p], _local_device(p))
        install(optimizer, state_dict, states)


def _local_device(p) -> torch.device:
    return p.to_local().device if is_dtensor(p) else p.device


def _indexed(optimizer):
    """(parameter, its group) in state_dict index order."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            yield p, group


#: the default engine (it keeps no state of its own)
PARAMS = ParamsEngine()
