"""``MicroAdam``: the torch.optim.Optimizer users construct.

A thin class: it validates, picks the implementation of a step (the PyTorch reference in
``functional`` or the Triton kernels) and runs one loop over the units of work its engine
(``engine.Engine``) hands it. Hyperparameters live in ``hyperparams``, the state in ``state``,
the block layout in ``geometry``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch

from .engine import PARAMS, Engine
from .functional import microadam_blocks_
from .geometry import Geometry, geometry_of, topk_count
from .hyperparams import DEFAULT_BLOCK_SIZE, DEFAULT_QUANT_BUCKET_SIZE, validate_hyperparameters
from .sharded import ShardedStepper, SplitStep
from .state import state_nbytes

BACKENDS = ("auto", "torch", "triton")
NONFINITE_POLICIES = ("skip", "raise")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


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
    #: memory is a few tens of bytes per chunk element (50 MiB measured at 1e8; docs/design.md)
    chunk_elements: int = 1 << 20

    #: How this optimizer reaches its parameters and their state (``engine.Engine``): plain tensors
    #: and DTensors by default; ``fsdp1.attach`` and the DeepSpeed integration set their own.
    engine: Engine = PARAMS

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
            raise RuntimeError(
                "backend='triton' needs the triton package: pip install 'microadam_dist[triton]' "
                "(or use backend='torch' / 'auto')"
            )
        defaults = dict(
            lr=lr,
            betas=tuple(betas) if isinstance(betas, list) else betas,
            eps=eps,
            weight_decay=weight_decay,
            window_size=window_size,
            density=density,
            block_size=block_size,
            quant_bucket_size=quant_bucket_size,
            alpha=alpha,
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
                    raise ValueError(
                        "MicroAdam does not support complex parameters; view them as real "
                        "with torch.view_as_real before building the optimizer"
                    )
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
            raise ValueError(
                f"backend='triton' handles window_size * k <= {triton_path.MAX_WINDOW_ENTRIES} "
                f"entries per block, got window_size={group['window_size']} * k={k} (density "
                f"{group['density']} of block_size {group['block_size']}); use backend='auto' "
                "(which falls back to the reference for such blocks) or a smaller window or density"
            )

    # ---- geometry and state --------------------------------------------------------------------
    @staticmethod
    def geometry(p: torch.Tensor, group: dict[str, Any]) -> Geometry:
        return geometry_of(p.shape, group)

    def state_bytes(self) -> int:
        """Exact bytes of all optimizer state tensors on this rank (step counters included)."""
        return sum(map(state_nbytes, self.state.values()))

    def blocks_fn(self, device: torch.device, group: dict[str, Any]):
        """The implementation of one step on a block range for ``group``'s tensors on ``device``:
        the PyTorch reference (a function), or the Triton kernels as a ``sharded.SplitStep`` (the
        gradient read once, its finiteness checked on the way).

        ``"auto"`` takes the Triton kernels for CUDA tensors when triton is installed and the
        kernels take the group's largest block, the PyTorch reference otherwise (always on the CPU).
        """
        if self.backend == "torch" or (self.backend == "auto" and not (device.type == "cuda" and triton_available())):
            return microadam_blocks_
        from .kernels import triton_path

        k = topk_count(float(group["density"]), group["block_size"])  # the group's largest block
        if self.backend == "auto" and not triton_path.supports(group["window_size"], k):
            return microadam_blocks_
        return SplitStep(triton_path.compress_triton_, triton_path.update_triton_)

    # ---- the step ------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step.

        A parameter whose grad is None is skipped (its step count does not advance). A parameter
        whose gradient holds a NaN or an infinity is skipped too (``nonfinite``). On empty state, a
        step with lr = 0 and an all-zero gradient only creates the state (this is the probe step
        torch.distributed.checkpoint runs) and leaves the step count at 0. Sharded parameters step
        on their local shard, bitwise like one process; every rank must call ``step``.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group_index, group in enumerate(self.param_groups):
            for work in self.engine.segments(self, group_index, group):
                stepper = self._steppers.get(work.key)
                if stepper is None:
                    stepper = self._steppers[work.key] = ShardedStepper(work.process_group, local=work.local)
                device = work.segments[0].param.device
                skipped = stepper.step(work.segments, work.states, self.chunk_elements, self.blocks_fn(device, group))
                if work.finish is not None:
                    work.finish()
                for key in skipped:
                    self._nonfinite(work.describe(key))
        return loss

    def _nonfinite(self, what: str) -> None:
        """The policy for a gradient with a NaN or an infinity: the step of that parameter is
        skipped (state, step count and parameter unchanged), counted and warned about; or, with
        ``nonfinite="raise"``, an error (nothing has been changed for that parameter either)."""
        self.nonfinite_skips += 1
        if self.nonfinite == "raise":
            raise FloatingPointError(
                f"MicroAdam: the gradient of {what} has a NaN or an infinity; its "
                "state is untouched (use nonfinite='skip' to skip such steps)"
            )
        warnings.warn(
            f"MicroAdam skipped the step of {what}: its gradient has a NaN or an infinity "
            f"({self.nonfinite_skips} skipped so far; state untouched)",
            RuntimeWarning,
            stacklevel=3,
        )

    @property
    def _steppers(self) -> dict:
        """One ShardedStepper (it caches an exchange plan) per unit of work; kept out of pickles."""
        if "_microadam_steppers" not in self.__dict__:
            self.__dict__["_microadam_steppers"] = {}
        return self.__dict__["_microadam_steppers"]

    # ---- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """torch's state_dict with each parameter's state as its engine saves it.

        Plain and FSDP2 parameters: the row form (``state.StateLayout.row_shapes``), as DTensors
        for FSDP2 (sharded by rows like the parameter, or replicated for 1-D ones), so
        torch.distributed.checkpoint saves it once and reshards it. Every rank must call it.
        """
        return self.engine.state_dict(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load state, refusing state of another geometry, optimizer, model or layout before
        anything is changed. The state tensors keep their saved dtypes."""
        self.engine.load_state_dict(self, state_dict)
