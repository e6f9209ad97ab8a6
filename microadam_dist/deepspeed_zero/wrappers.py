"""Finding DeepSpeed's objects around a MicroAdam: the ZeRO optimizer that wraps it, and the engine.

Nothing here imports DeepSpeed unless it is already imported (``sys.modules``): a process that never
uses DeepSpeed never pays for it.
"""

from __future__ import annotations

import sys


def wrapper_kind(obj) -> str | None:
    """'zero12', 'zero3', 'bf16' for DeepSpeed's partitioning optimizer wrappers, else None."""
    if "deepspeed" not in sys.modules:
        return None
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if isinstance(obj, DeepSpeedZeroOptimizer_Stage3):
        return "zero3"
    if isinstance(obj, DeepSpeedZeroOptimizer):
        return "zero12"
    if isinstance(obj, BF16_Optimizer):
        return "bf16"
    return None


def engine_on_stack():
    """The DeepSpeedEngine whose method is running further up the call stack, if any.

    DeepSpeed builds a JSON config's optimizer inside ``DeepSpeedEngine._configure_basic_optimizer``
    with only the parameters and the config's params: the stack is the one place the engine shows.
    """
    if "deepspeed" not in sys.modules:
        return None
    from deepspeed.runtime.engine import DeepSpeedEngine

    frame = sys._getframe(1)
    while frame is not None:
        obj = frame.f_locals.get("self")
        if isinstance(obj, DeepSpeedEngine):
            return obj
        frame = frame.f_back
    return None


def wrapper_on_stack(opt):
    """The ZeRO optimizer that is calling into ``opt`` (a frame whose ``self.optimizer is opt``)."""
    frame = sys._getframe(1)
    while frame is not None:
        obj = frame.f_locals.get("self")
        if (
            obj is not None
            and obj is not opt
            and getattr(obj, "optimizer", None) is opt
            and wrapper_kind(obj) is not None
        ):
            return obj
        frame = frame.f_back
    return None
