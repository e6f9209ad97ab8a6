"""A step is all or nothing: limits are checked when the optimizer is built, ``backend="auto"``
falls back to the reference where the Triton kernels cannot take a geometry, and a parameter's
step count advances only once its step has been applied."""

from __future__ import annotations

import pytest
import torch

from microadam_dist import MicroAdam
from microadam_dist.functional import microadam_blocks_
from microadam_dist.optimizer import triton_available

needs_triton = pytest.mark.skipif(not triton_available(), reason="the triton package is not installed")

# window 10 x k 1024 (density 1/4 of 4096-element blocks) = 10240 entries per block, over the
# Triton update kernel's 8192: the first 8 steps fit (8 x 1024), the 9th would not
OVER = dict(window_size=10, density=0.25, block_size=4096, quant_bucket_size=2048)


@needs_triton
def test_triton_backend_refuses_a_geometry_over_its_limit_when_built():
    p = torch.nn.Parameter(torch.zeros(4096))
    with pytest.raises(ValueError, match=r"window_size \* k <= 8192.*window_size=10 \* k=1024"):
        MicroAdam([p], backend="triton", **OVER)
    with pytest.raises(ValueError, match="window_size"):  # and for a group added later
        opt = MicroAdam([torch.nn.Parameter(torch.zeros(8))], backend="triton")
        opt.add_param_group({"params": [p], **OVER})
    assert len(opt.param_groups) == 1  # the refused group was not kept


@needs_triton
def test_auto_backend_falls_back_to_the_reference_for_such_a_geometry():
    """What "auto" runs for CUDA tensors: the Triton kernels (both halves of a fused step) where
    they take the group's largest block, the reference for a group over their limit."""
    from microadam_dist.kernels import triton_path
    from microadam_dist.sharded import SplitStep

    auto = MicroAdam([torch.nn.Parameter(torch.zeros(4096))], lr=1e-3, backend="auto")
    auto.add_param_group({"params": [torch.nn.Parameter(torch.zeros(4096))], **OVER})
    fits, over = auto.param_groups
    assert auto.blocks_fn(torch.device("cuda"), fits) == SplitStep(
        triton_path.compress_triton_, triton_path.update_triton_
    )
    assert auto.blocks_fn(torch.device("cuda"), over) is microadam_blocks_
    assert auto.blocks_fn(torch.device("cpu"), fits) is microadam_blocks_


def test_step_count_advances_only_after_the_step_is_applied():
    p = torch.nn.Parameter(torch.randn(300))
    opt = MicroAdam([p], lr=1e-3, block_size=64, quant_bucket_size=16)
    p.grad = torch.randn(300)
    opt.step()
    assert int(opt.state[p]["step"]) == 1

    def failing(*args):
        raise RuntimeError("kernel failed")

    opt.blocks_fn = lambda device, group: failing
    p.grad = torch.randn(300)
    with pytest.raises(RuntimeError, match="kernel failed"):
        opt.step()
    assert int(opt.state[p]["step"]) == 1  # not advanced by the step that failed
