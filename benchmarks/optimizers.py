"""The optimizers the benchmarks compare, and exact optimizer-state bytes (shared by bench_*.py)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from microadam_dist import MicroAdam

ROOT = Path(__file__).resolve().parent.parent
BASELINES = ["adamw_fused", "adamw_foreach", "bnb_adamw8bit", "torchao_adamw8bit", "torchao_adamw4bit"]


def _bitsandbytes():
    # the repo's top-level kernels/ folder must not shadow the PyPI package `kernels` that
    # bitsandbytes probes for (it would only warn, but keep the import clean)
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if Path(p or os.getcwd()).resolve() != ROOT]
    try:
        import bitsandbytes
    finally:
        sys.path[:] = saved
    return bitsandbytes


def make(name: str, params, lr: float = 1e-4, **microadam_kwargs) -> torch.optim.Optimizer:
    """The optimizer called ``name``, weight decay 0 everywhere (torch's AdamW and the 8-bit ones
    default to 0.01); raises ImportError/RuntimeError if it cannot run here. ``adamw`` is the
    foreach AdamW; ``microadam:key=value,...`` is MicroAdam with those settings."""
    params = list(params)
    if name.startswith("microadam:"):  # a variant, e.g. "microadam:density=0.02,window_size=5"
        settings = dict(item.split("=") for item in name.split(":", 1)[1].split(","))
        return MicroAdam(
            params, lr=lr, **{k: (int(v) if k == "window_size" else float(v)) for k, v in settings.items()}
        )
    if name == "microadam":
        return MicroAdam(params, lr=lr, **microadam_kwargs)  # defaults: window 10, density 0.01
    if name in ("adamw", "adamw_foreach"):
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, foreach=True)
    if name == "adamw_fused":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=True)
    if name == "bnb_adamw8bit":
        return _bitsandbytes().optim.AdamW8bit(params, lr=lr, weight_decay=0.0)
    if name in ("torchao_adamw8bit", "torchao_adamw4bit"):
        from torchao.optim import AdamW4bit, AdamW8bit

        cls = AdamW8bit if name == "torchao_adamw8bit" else AdamW4bit
        return cls(params, lr=lr, weight_decay=0.0)
    raise ValueError(f"unknown optimizer {name!r}")


def tensor_bytes(t, seen: set) -> int:
    """Bytes of a state tensor; subclass tensors (torchao's OptimState8bit/4bit) by their inner
    tensors; DTensors by their local shard; a storage shared between parameters counted once."""
    if not isinstance(t, torch.Tensor):
        return 0
    if hasattr(t, "to_local"):
        t = t.to_local()
    if type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n), seen) for n in names)
    key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel(), t.dtype)
    if t.numel() and key in seen:
        return 0
    seen.add(key)
    return t.numel() * t.element_size()


def state_bytes(opt: torch.optim.Optimizer) -> int:
    if isinstance(opt, MicroAdam):
        return opt.state_bytes()
    seen: set = set()
    return sum(tensor_bytes(v, seen) for st in opt.state.values() for v in st.values())
