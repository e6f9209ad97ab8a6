"""``MicroAdam``: the torch.optim.Optimizer users construct.

This file holds validation, state bookkeeping and checkpoint dtypes; the math lives in
``functional.py`` and the block layout in ``geometry.py``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import Any

import torch

from . import fsdp
from .functional import (
    STATE_DTYPES,
    StepConfig,
    all_finite,
    any_nonzero,
    canonical_shapes,
    from_row_form,
    init_state,
    microadam_blocks_,
    to_row_form,
)
from .geometry import Geometry, geometry_for, same_geometry_setting, topk_count
from .sharded import ShardedStepper

#: Fixed defaults, never derived from the device (see docs/design.md for the reasoning).
DEFAULT_BLOCK_SIZE = 4096
DEFAULT_QUANT_BUCKET_SIZE = 2048
MAX_BLOCK_SIZE = 1 << 15  # block-local indices are int16
BACKENDS = ("auto", "torch", "triton")
NONFINITE_POLICIES = ("skip", "raise")
#: Hyperparameters that shape the state; a checkpoint made with other values cannot be loaded.
GEOMETRY_KEYS = ("window_size", "density", "block_size", "quant_bucket_size")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def validate_hyperparameters(group: dict[str, Any]) -> None:
    """Raise ValueError naming the first hyperparameter outside its allowed range."""
    lr = group["lr"]
    if isinstance(lr, torch.Tensor):
        raise ValueError("Invalid lr: a Tensor; lr must be a Python float")
    if not _is_number(lr) or not lr >= 0.0 or not math.isfinite(lr):
        raise ValueError(f"Invalid lr: {lr!r}; it must be a finite float >= 0")
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas!r}; it must be a pair (beta1, beta2)")
    for i, b in enumerate(betas):
        if not _is_number(b) or not 0.0 <= b < 1.0:
            raise ValueError(f"Invalid beta{i + 1}: {b!r}; it must be in [0, 1)")
    eps = group["eps"]
    if not _is_number(eps) or not eps >= 0.0 or not math.isfinite(eps):
        raise ValueError(f"Invalid eps: {eps!r}; it must be a finite float >= 0")
    wd = group["weight_decay"]
    if not _is_number(wd) or not wd >= 0.0 or not math.isfinite(wd):
        raise ValueError(f"Invalid weight_decay: {wd!r}; it must be a finite float >= 0")
    m = group["window_size"]
    if not _is_int(m) or m < 1:
        raise ValueError(f"Invalid window_size: {m!r}; it must be an integer >= 1")
    d = group["density"]
    if not _is_number(d) or not 0.0 < d <= 1.0:
        raise ValueError(f"Invalid density: {d!r}; it must be in (0, 1]")
    alpha = group.get("alpha", 0.0)
    if not _is_number(alpha) or not 0.0 <= alpha < 1.0:
        raise ValueError(f"Invalid alpha: {alpha!r}; it must be in [0, 1) (0 turns densification off)")
    b = group["block_size"]
    if not _is_int(b) or not 1 <= b <= MAX_BLOCK_SIZE:
        raise ValueError(
            f"Invalid block_size: {b!r}; it must be an integer in [1, {MAX_BLOCK_SIZE}] "
            "(block-local indices are stored as int16)"
        )
    q = group["quant_bucket_size"]
    if not _is_int(q) or not 1 <= q <= b or b % q:
        raise ValueError(
            f"Invalid quant_bucket_size: {q!r}; it must be an integer that divides "
            f"block_size={b} (buckets tile each block)"
        )


class MicroAdam(torch.optim.Optimizer):
    r"""MicroAdam (Modoranu et al., NeurIPS 2024): Adam rebuilt from a window of sparse gradients.

    Per parameter it keeps a 4-bit error feedback and, for each block of ``block_size``
    consecutive elements of a row, the ``ceil(density * block)`` entries of largest magnitude of
    the last ``window_size`` error-corrected gradients. At ``window_size=10, density=0.01`` that
    is about 0.9 byte of state per parameter, against 8 for AdamW.

    Args:
        params: parameters or parameter groups.
        lr: learning rate. MicroAdam's update is larger than Adam's in steady state (the bias
            correction uses the true step while the window holds only ``window_size`` terms), so
            it usually wants a smaller learning rate than AdamW.
        betas: (beta1, beta2), as in Adam.
        eps: added to the denominator, outside the square root.
        weight_decay: decoupled weight decay, as in AdamW.
        window_size: m, the number of sparse gradients kept.
        density: fraction of each block kept per step, in (0, 1].
        block_size: elements per top-k block (<= 32768). Blocks never cross a row (dim 0).
        quant_bucket_size: elements per 4-bit quantization bucket; divides ``block_size``.
        alpha: the authors' densification, in [0, 1): each step also applies ``alpha`` times the
            4-bit error feedback (a dense update) and keeps ``1 - alpha`` of it. 0 (the default)
            is the plain algorithm.
        backend: ``"auto"`` (Triton for CUDA tensors when available, else PyTorch), ``"torch"``
            or ``"triton"``.

    lr, betas, eps, weight_decay and alpha may differ per parameter group; so may the four geometry
    hyperparameters, which cannot change once a parameter has state.
    """

    #: elements per bounded chunk of work inside a large parameter: the reference path's transient
    #: memory is a few tens of bytes per chunk element (54 MiB measured at 1e8; docs/design.md)
    chunk_elements: int = 1 << 20

    #: Set by an engine integration whose parameters are engine-owned flat buffers (DeepSpeed
    #: ZeRO's partitions). It must provide ``step_group(opt, group_index, group) -> bool`` (True
    #: when it stepped that group), ``state_dict(opt, sd) -> sd`` and
    #: ``load_state_dict(opt, sd) -> sd | None`` (None when it loaded everything itself).
    engine_adapter = None

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        window_size: int = 10,
        density: float = 0.01,
        block_size: int = DEFAULT_BLOCK_SIZE,
        quant_bucket_size: int = DEFAULT_QUANT_BUCKET_SIZE,
        backend: str = "auto",
        nonfinite: str = "skip",
        alpha: float = 0.0,
    ):
        if backend not in BACKENDS:
            raise ValueError(f"Invalid backend: {backend!r}; choose one of {BACKENDS}")
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"Invalid nonfinite: {nonfinite!r}; choose one of {NONFINITE_POLICIES}")
        if backend == "triton" and not triton_available():
            raise RuntimeError("backend='triton' needs the triton package: pip install 'microadam_dist[triton]' "
                               "(or use backend='torch' / 'auto')")
        defaults = dict(
            lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps,
            weight_decay=weight_decay, window_size=window_size, density=density,
            block_size=block_size, quant_bucket_size=quant_bucket_size, alpha=alpha,
        )
        validate_hyperparameters(defaults)
        self.backend = backend
        self.nonfinite = nonfinite
        #: parameter steps skipped so far because the gradient held a NaN or an infinity
        self.nonfinite_skips = 0
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            validate_hyperparameters(group)
            if self.backend == "triton":
                self._check_triton_limits(group)
            for p in group["params"]:
                if p.is_complex():
                    raise ValueError("MicroAdam does not support complex parameters; view them as real "
                                     "with torch.view_as_real before building the optimizer")
                if not p.is_floating_point():
                    raise ValueError(f"MicroAdam needs floating-point parameters, got {p.dtype}")
        except ValueError:
            self.param_groups.pop()
            raise

    @staticmethod
    def _check_triton_limits(group: dict[str, Any]) -> None:
        """backend='triton' must take every block the group can have (the largest has
        ``ceil(density * block_size)`` entries per slot): refuse now, not at some later step."""
        from .kernels import triton_path

        k = topk_count(float(group["density"]), group["block_size"])
        if not triton_path.supports(group["window_size"], k):
            raise ValueError(f"backend='triton' handles window_size * k <= {triton_path.MAX_WINDOW_ENTRIES} "
                             f"entries per block, got window_size={group['window_size']} * k={k} (density "
                             f"{group['density']} of block_size {group['block_size']}); use backend='auto' "
                             "(which falls back to the reference for such blocks) or a smaller window or density")

    # ---- geometry and state --------------------------------------------------------------------
    @staticmethod
    def geometry(p: torch.Tensor, group: dict[str, Any]) -> Geometry:
        return geometry_for(tuple(p.shape), group["block_size"], group["quant_bucket_size"],
                            float(group["density"]))

    def state_bytes(self) -> int:
        """Exact bytes of all optimizer state tensors (the per-parameter step counters included)."""
        def nbytes(x) -> int:
            if isinstance(x, torch.Tensor):
                x = x.to_local() if fsdp.is_dtensor(x) else x
                return x.numel() * x.element_size()
            return sum(map(nbytes, x.values())) if isinstance(x, dict) else 0

        return sum(map(nbytes, self.state.values()))

    def blocks_fn(self, device: torch.device):
        """The implementation of one step on a block range for tensors on ``device``.

        ``"auto"`` takes the Triton kernels for CUDA tensors when triton is installed and the
        kernels take the geometry, the PyTorch reference otherwise (always on the CPU).
        """
        if self.backend == "torch" or (self.backend == "auto" and not (device.type == "cuda" and triton_available())):
            return microadam_blocks_
        from .kernels import triton_path

        if self.backend == "triton":  # its limits were checked when the groups were added
            return triton_path.microadam_blocks_triton_

        def auto(geometry, b0, b1, param, grad, state, cfg):
            k = max((piece.k for piece in geometry.rects(b0, b1)), default=0)
            fn = triton_path.microadam_blocks_triton_ if triton_path.supports(cfg.window_size, k) else microadam_blocks_
            return fn(geometry, b0, b1, param, grad, state, cfg)

        return auto

    # ---- the step ------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step.

        A parameter whose grad is None is skipped (its step count does not advance). On empty
        state, a step with lr = 0 and an all-zero gradient only creates the state (this is the
        probe step torch.distributed.checkpoint runs) and leaves the step count at 0.
        FSDP2 parameters (DTensors) step on their local shard; every rank must call ``step``.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group_index, group in enumerate(self.param_groups):
            if self.engine_adapter is not None and self.engine_adapter.step_group(self, group_index, group):
                continue
            sharded: dict[Any, list] = {}  # process group -> [(param, segment)]
            for param_index, p in enumerate(group["params"]):
                if p.numel() == 0:
                    continue
                if p.grad is not None:
                    self._check_grad(p, p.grad)
                if fsdp.is_dtensor(p):
                    seg, pg = fsdp.dtensor_segment(p, (group_index, param_index), self.geometry(p, group), group)
                    sharded.setdefault(pg, []).append((p, seg))
                elif getattr(p, "_fsdp_flattened", False):
                    raise RuntimeError(
                        "this parameter is an FSDP1 (FullyShardedDataParallel) shard: call "
                        "microadam_dist.fsdp1.attach(optimizer, model) once after building the optimizer"
                    )
                elif p.grad is not None:
                    self._step_param(p, group)
            for pg, items in sharded.items():
                stepper = self._steppers.setdefault(pg, ShardedStepper(pg))
                states = {seg.key: self.state[p] for p, seg in items if p.grad is not None}
                device = items[0][1].param.device
                skipped = stepper.step([seg for _, seg in items], states, self.chunk_elements, self.blocks_fn(device))
                for key in skipped:
                    self._nonfinite(f"parameter {key[1]} of group {key[0]}")
        return loss

    def _nonfinite(self, what: str) -> None:
        """The policy for a gradient with a NaN or an infinity: the step of that parameter is
        skipped (state, step count and parameter unchanged), counted and warned about; or, with
        ``nonfinite="raise"``, an error (nothing has been changed for that parameter either)."""
        self.nonfinite_skips += 1
        if self.nonfinite == "raise":
            raise FloatingPointError(f"MicroAdam: the gradient of {what} has a NaN or an infinity; its "
                                     "state is untouched (use nonfinite='skip' to skip such steps)")
        warnings.warn(f"MicroAdam skipped the step of {what}: its gradient has a NaN or an infinity "
                      f"({self.nonfinite_skips} skipped so far; state untouched)", RuntimeWarning, stacklevel=3)

    def _step_param(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        if not all_finite(p.grad, self.chunk_elements):
            index = next(i for i, q in enumerate(group["params"]) if q is p)
            group_index = next(i for i, g in enumerate(self.param_groups) if g is group)
            self._nonfinite(f"parameter {index} of group {group_index} "
                            f"(shape {tuple(p.shape)})")
            return
        geom = self.geometry(p, group)
        state = self.state[p]
        if not state:
            state.update(init_state(geom, group["window_size"], 0, geom.num_blocks, p.device))
            if group["lr"] == 0 and not any_nonzero(p.grad, self.chunk_elements):
                return  # state-creating probe: nothing else changes
        cfg = StepConfig.from_group(group, step=int(state["step"]) + 1, chunk_elements=self.chunk_elements)
        flat_param = p.view(-1) if p.is_contiguous() else p.detach().reshape(-1).clone()
        grad = p.grad.reshape(-1)
        if self.backend != "torch" and not grad.is_contiguous():
            grad = grad.contiguous()
        self.blocks_fn(p.device)(geom, 0, geom.num_blocks, flat_param, grad, state, cfg)
        if flat_param.data_ptr() != p.data_ptr():
            p.copy_(flat_param.view_as(p))
        state["step"] += 1  # only once the step is applied

    @property
    def _steppers(self) -> dict:
        if "_microadam_steppers" not in self.__dict__:
            self.__dict__["_microadam_steppers"] = {}
        return self.__dict__["_microadam_steppers"]

    @staticmethod
    def _check_grad(p: torch.Tensor, grad: torch.Tensor) -> None:
        if grad.is_sparse:
            raise RuntimeError("MicroAdam does not support sparse gradients; use dense gradients "
                               "(for nn.Embedding, sparse=False)")
        if grad.is_complex() or not grad.is_floating_point():
            raise RuntimeError(f"MicroAdam needs real floating-point gradients, got {grad.dtype}")
        if grad.shape != p.shape:
            raise RuntimeError(f"gradient shape {tuple(grad.shape)} does not match parameter "
                               f"shape {tuple(p.shape)}")
        if grad.device != p.device:
            raise RuntimeError(f"gradient on {grad.device} but parameter on {p.device}")

    # ---- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """torch's state_dict, each parameter's state in the canonical row form.

        Row form (``functional.canonical_shapes``): window tensors ``(window_size, rows, k_row)``,
        codes ``(rows, bytes_row)``, statistics ``(rows, buckets_row, 2)``; FSDP2 parameters'
        state is DTensors (sharded by rows like the parameter, or replicated for 1-D ones), so
        torch.distributed.checkpoint saves it once and reshards it. Every rank must call it.
        """
        sd = super().state_dict()
        if self.engine_adapter is not None:  # it owns the layout of its parameters' state
            return self.engine_adapter.state_dict(self, sd)
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                if index in sd["state"]:
                    state, geom, m = sd["state"][index], self.geometry(p, group), group["window_size"]
                    if fsdp.is_dtensor(p):
                        sd["state"][index] = fsdp.export_state(p, state, geom, m)
                    else:
                        sd["state"][index] = to_row_form(state, geom, m, rows=geom.rows)
                index += 1
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load state, refusing state of another geometry, optimizer or model.

        The state tensors keep their saved dtypes (torch's loader would cast floating-point state
        to the parameter's dtype: bf16 window values to fp32, fp32 statistics to bf16), so only
        the hyperparameters go through ``torch.optim.Optimizer.load_state_dict``.
        """
        if self.engine_adapter is not None:
            state_dict = self.engine_adapter.load_state_dict(self, state_dict)
            if state_dict is None:
                return
        saved_groups = state_dict.get("param_groups")
        if saved_groups is None or "state" not in state_dict:
            raise ValueError("not an optimizer state_dict: it needs 'state' and 'param_groups'")
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"the state_dict has {len(saved_groups)} parameter groups, "
                             f"this optimizer has {len(self.param_groups)}")
        id_to_param = {}
        for i, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            for key in GEOMETRY_KEYS:
                if key not in saved:
                    raise ValueError(f"parameter group {i} of the state_dict has no {key!r}: "
                                     "it was not saved by MicroAdam")
                if not same_geometry_setting(key, saved[key], group[key]):
                    raise ValueError(
                        f"cannot load MicroAdam state saved with {key}={saved[key]!r} into an "
                        f"optimizer with {key}={group[key]!r} (parameter group {i}); build the "
                        f"optimizer with {key}={saved[key]!r} to resume this checkpoint"
                    )
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"parameter group {i}: the state_dict has {len(saved['params'])} "
                                 f"parameters, the optimizer {len(group['params'])}")
            id_to_param.update(zip(saved["params"], [(p, group) for p in group["params"]]))
        for pid, st in state_dict["state"].items():
            if pid not in id_to_param:
                raise ValueError(f"the state_dict has state for unknown parameter id {pid!r}")
            p, group = id_to_param[pid]
            self._check_saved_state(pid, p, group, fsdp.narrow_saved(st) if fsdp.is_dtensor(p) else st)
        imported = {}
        for pid, st in state_dict["state"].items():
            p, group = id_to_param[pid]
            geom, m = self.geometry(p, group), group["window_size"]
            if fsdp.is_dtensor(p):
                imported[p] = fsdp.import_state(p, st, geom, m)
            else:
                imported[p] = from_row_form(st, geom, m)
            imported[p] = {k: v if k == "step" else v.to(p.device) for k, v in imported[p].items()}
        super().load_state_dict({**state_dict, "state": {}})  # hyperparameters only
        for group in self.param_groups:  # a state_dict saved before alpha existed: no densification
            if group.get("alpha") is None:
                group["alpha"] = 0.0
        for p, st in imported.items():
            self.state[p] = st

    def _check_saved_state(self, pid, p: torch.Tensor, group: dict[str, Any], st: dict[str, Any]) -> None:
        expected = canonical_shapes(self.geometry(p, group), group["window_size"])
        if not isinstance(st, dict) or set(st) != set(expected):
            keys = sorted(st) if isinstance(st, dict) else type(st).__name__
            raise ValueError(f"state of parameter {pid!r} has keys {keys}, expected MicroAdam's "
                             f"{sorted(expected)}: is this another optimizer's checkpoint?")
        for key, shape in expected.items():
            value = st[key]
            if not isinstance(value, torch.Tensor) or value.dtype != STATE_DTYPES[key]:
                got = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"state {key!r} of parameter {pid!r} is {got}, expected "
                                 f"{STATE_DTYPES[key]}")
            if tuple(value.shape) != shape:
                raise ValueError(
                    f"state {key!r} of parameter {pid!r} has shape {tuple(value.shape)}, expected "
                    f"{shape} for a parameter of shape {tuple(p.shape)}: the checkpoint belongs to "
                    "a different model"
                )
