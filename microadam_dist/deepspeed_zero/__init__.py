"""DeepSpeed ZeRO stages 0-3 with MicroAdam (docs/design.md, section "DeepSpeed ZeRO").

Ways in:

* the JSON config: ``"optimizer": {"type": "MicroAdam", "params": {...}}`` with
  ``"zero_allow_untested_optimizer": true``. ``import microadam_dist`` registers
  ``torch.optim.MicroAdam`` (:func:`register_with_torch_optim`), which DeepSpeed resolves with
  ``getattr(torch.optim, "MicroAdam")``: that is :class:`DeepSpeedMicroAdam`, whose engine
  (``partitions.ZeroEngine``) finds DeepSpeed's engine and ZeRO optimizer by itself;
* :func:`initialize` (builds the optimizer from keyword arguments) or :func:`attach` (after a
  ``deepspeed.initialize`` that was given a MicroAdam built by hand).

The modules: ``wrappers`` (finding DeepSpeed's objects), ``partitions`` (the ZeRO engine: steps,
state_dicts), ``resume`` (loads at any world size), ``reshard`` (DeepSpeed's own layout at another
size, for ``microadam-ckpt reshard``). DeepSpeed itself is imported only when used.
"""

from __future__ import annotations

import copy
import json
import warnings

import torch

from ..optimizer import MicroAdam
from .partitions import MicroAdamCheckpointError, ZeroEngine, gather_canonical_state
from .resume import attach, guard_checkpoint_loads, load_canonical, load_checkpoint
from .wrappers import engine_on_stack


class DeepSpeedMicroAdam(MicroAdam):
    """MicroAdam that maps DeepSpeed ZeRO partitions by itself (what ``"type": "MicroAdam"`` builds).

    Built by DeepSpeed from the JSON config, it finds the engine that is building it on the call
    stack; built by hand, pass it to ``deepspeed.initialize(optimizer=...)``: it then finds the ZeRO
    optimizer when that calls its ``step`` (or use :func:`initialize` / :func:`attach`).
    """

    def __init__(self, params, *args, **kwargs):
        super().__init__(params, *args, **kwargs)
        ds_engine = engine_on_stack()
        self.engine = ZeroEngine(ds_engine=ds_engine, on_engine=guard_checkpoint_loads)
        if ds_engine is not None:
            guard_checkpoint_loads(ds_engine)


def register_with_torch_optim(strict: bool = True) -> bool:
    """Make ``"optimizer": {"type": "MicroAdam"}`` resolve in DeepSpeed configs.

    DeepSpeed matches its own optimizer names case-insensitively and any other name with
    ``getattr(torch.optim, name)`` (``DeepSpeedEngine._configure_basic_optimizer``), so this sets
    ``torch.optim.MicroAdam``. Idempotent; never replaces another library's ``torch.optim.MicroAdam``:
    that raises RuntimeError, or with ``strict=False`` (what ``import microadam_dist`` does) warns
    and returns False.
    """
    existing = getattr(torch.optim, "MicroAdam", None)
    if existing is None or existing is DeepSpeedMicroAdam:
        torch.optim.MicroAdam = DeepSpeedMicroAdam
        return True
    if isinstance(existing, type) and issubclass(existing, MicroAdam):
        return True
    message = (
        f"torch.optim.MicroAdam is already {existing!r}, not microadam_dist's: a DeepSpeed config's "
        '"type": "MicroAdam" builds that one; pass microadam_dist.deepspeed_zero.DeepSpeedMicroAdam '
        "to deepspeed.initialize(optimizer=...) or use microadam_dist.deepspeed_zero.initialize"
    )
    if strict:
        raise RuntimeError(message)
    warnings.warn(message, RuntimeWarning, stacklevel=2)
    return False


def skip_cpu_shm_build() -> None:
    """On CPU, keep DeepSpeed from JIT-compiling its shared-memory all-reduce op (over a minute with a
    C++ compiler, once per machine): only its inference path uses it; training goes through gloo."""
    import deepspeed

    if not torch.cuda.is_available():
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def load_config(config) -> dict:
    """A DeepSpeed config from a dict (copied) or a JSON file."""
    if isinstance(config, dict):
        return copy.deepcopy(config)
    with open(config) as f:
        return json.load(f)


def initialize(model, config, model_parameters=None, deepspeed_kwargs: dict | None = None, **microadam_kwargs):
    """``deepspeed.initialize`` with a MicroAdam built from ``microadam_kwargs``.

    ``config`` is a dict or a JSON file. Its ``"optimizer"`` entry, if any, must be MicroAdam's (and
    then ``microadam_kwargs`` override its params). ``"zero_allow_untested_optimizer"`` is set, and with
    ``offload_optimizer`` so is ``"zero_force_ds_cpu_optimizer": false``. Returns DeepSpeed's tuple
    ``(engine, optimizer, dataloader, lr_scheduler)``.
    """
    import deepspeed

    cfg = load_config(config)
    entry = cfg.pop("optimizer", None)
    params = {}
    if entry is not None:
        if entry.get("type") != "MicroAdam":
            raise ValueError(f"the config's optimizer is {entry.get('type')!r}; initialize() builds MicroAdam")
        params = dict(entry.get("params", {}))
    params.update(microadam_kwargs)
    cfg["zero_allow_untested_optimizer"] = True
    offload = cfg.get("zero_optimization", {}).get("offload_optimizer") or {}
    if offload.get("device", "none") != "none":
        cfg.setdefault("zero_force_ds_cpu_optimizer", False)
    if model_parameters is None:
        model_parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = DeepSpeedMicroAdam(model_parameters, **params)
    out = deepspeed.initialize(model=model, optimizer=optimizer, config=cfg, **(deepspeed_kwargs or {}))
    attach(out[0])
    return out


__all__ = [
    "DeepSpeedMicroAdam",
    "MicroAdamCheckpointError",
    "ZeroEngine",
    "attach",
    "gather_canonical_state",
    "initialize",
    "load_canonical",
    "load_checkpoint",
    "load_config",
    "register_with_torch_optim",
    "skip_cpu_shm_build",
]
