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
    """The "auto" path for CUDA tensors, run here on CPU tensors: for blocks over the kernels'
    limit it must take the reference, for all 12 steps (bitwise the reference's result)."""
    torch.manual_seed(0)
    p_auto = torch.nn.Parameter(torch.randn(4096))
    p_ref = torch.nn.Parameter(p_auto.detach().clone())
    auto = MicroAdam([p_auto], lr=1e-3, backend="auto", **OVER)
    ref = MicroAdam([p_ref], lr=1e-3, backend="torch", **OVER)
    auto_step = auto.blocks_fn(torch.device("cuda"))  # what "auto" runs for a CUDA parameter
    assert auto_step is not microadam_blocks_
    auto.blocks_fn = lambda device: auto_step
    for _ in range(12):
        g = torch.randn(4096)
        p_auto.grad, p_ref.grad = g.clone(), g.clone()
        auto.step()
        ref.step()
    assert torch.equal(p_auto, p_ref)
    assert int(auto.state[p_auto]["step"]) == 12


def test_step_count_advances_only_after_the_step_is_applied():
    p = torch.nn.Parameter(torch.randn(300))
    opt = MicroAdam([p], lr=1e-3, block_size=64, quant_bucket_size=16)
    p.grad = torch.randn(300)
    opt.step()
    assert int(opt.state[p]["step"]) == 1

    def failing(*args):
        raise RuntimeError("kernel failed")

    opt.blocks_fn = lambda device: failing
    p.grad = torch.randn(300)
    with pytest.raises(RuntimeError, match="kernel failed"):
        opt.step()
    assert int(opt.state[p]["step"]) == 1  # not advanced by the step that failed
