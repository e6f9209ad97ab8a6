"""The Triton path against the PyTorch reference (in Triton's interpreter when there is no GPU).

Indices, codes, window values and bucket statistics must be bitwise equal: both sides compute
a = g + dequant(e) with the same fp32 operations, IEEE division and an explicit bf16 rounding.
Parameters are compared with a tolerance: the kernels sum a repeated index's window entries in
another order than the reference's scatter_add, a few fp32 ulps of M and S.
"""

import contextlib

import pytest
import torch

from microadam_dist import MicroAdam, geometry_for
from microadam_dist.functional import StepConfig, microadam_blocks_
from microadam_dist.kernels import triton_path  # noqa: E402  (triton is installed by make test)
from microadam_dist.state import StateLayout

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def run_both(
    shape,
    dtype,
    weight_decay,
    steps,
    density=0.05,
    block=64,
    bucket=16,
    window=3,
    block_range=None,
    grads=None,
    alpha=0.0,
):
    geom = geometry_for(shape, block, bucket, density)
    b0, b1 = block_range or (0, geom.num_blocks)
    e0, e1 = geom.block_start(b0)[0], geom.block_start(b1)[0]
    gen = torch.Generator().manual_seed(11)
    p_ref = torch.randn(e1 - e0, generator=gen).to(dtype).to(DEVICE)
    p_tri = p_ref.clone()
    s_ref = StateLayout(geom, window, b0, b1).zeros(DEVICE)
    s_tri = {k: v.clone() for k, v in s_ref.items()}
    for t in range(1, steps + 1):
        g = (grads(t, e1 - e0) if grads else torch.randn(e1 - e0, generator=gen)).to(dtype).to(DEVICE)
        cfg = StepConfig(
            lr=1e-2,
            beta1=0.9,
            beta2=0.999,
            eps=1e-8,
            weight_decay=weight_decay,
            window_size=window,
            step=t,
            alpha=alpha,
        )
        microadam_blocks_(geom, b0, b1, p_ref, g, s_ref, cfg)
        triton_path.microadam_blocks_triton_(geom, b0, b1, p_tri, g.clone(), s_tri, cfg)
        for key in ("window_idx", "window_val", "ef_codes", "ef_stats"):
            assert torch.equal(s_ref[key], s_tri[key]), (key, t)
        if dtype == torch.float32:
            torch.testing.assert_close(p_tri, p_ref, rtol=1e-6, atol=1e-7)
        else:  # one bf16 rounding of values that differ by fp32 ulps: at most one bf16 ulp
            ulp = torch.finfo(torch.bfloat16).eps * p_ref.float().abs().clamp_min(1e-2)
            assert ((p_tri.float() - p_ref.float()).abs() <= ulp).all(), t
    return p_ref, p_tri


@pytest.mark.parametrize("shape", [(7, 100), (130,), (), (3, 50), (2, 3, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_triton_matches_reference(shape, dtype, weight_decay):
    run_both(shape, dtype, weight_decay, steps=8)  # window 3: the ring wraps twice


@pytest.mark.parametrize(
    "shape, dtype, weight_decay",
    [
        ((7, 100), torch.float32, 0.1),
        ((130,), torch.bfloat16, 0.0),
        ((2, 3, 40), torch.bfloat16, 0.1),
        ((), torch.float32, 0.0),
    ],
)
def test_densification_matches_reference(shape, dtype, weight_decay):
    """alpha > 0: the separate dense pass (kernels/densify.py) requantizes e bitwise as the
    reference does and moves every coordinate."""
    p0 = run_both(shape, dtype, weight_decay, steps=0)[0].clone()
    p_ref, p_tri = run_both(shape, dtype, weight_decay, steps=5, alpha=0.5)
    moved = (p_tri != p0).float().mean()
    # dense: the sparse update alone moves at most 5 steps * 5% of the coordinates (bf16 rounding
    # swallows some of the smallest dense moves)
    assert moved > 0.5 or p0.numel() == 1, moved


def test_density_one():
    run_both((5, 40), torch.float32, 0.1, steps=4, density=1.0)


def test_exact_ties():
    def grads(t, n):
        if t == 1:
            return torch.zeros(n)  # every |a| equal: the smallest indices win
        if t == 2:
            return torch.full((n,), 0.5)
        g = torch.randint(-2, 3, (n,)).float()  # many ties at the k-th value
        return g

    run_both((6, 90), torch.float32, 0.0, steps=5, grads=grads)


def test_block_range_starting_mid_row():
    geom = geometry_for((9, 150), 64, 16, 0.05)  # 3 blocks per row
    run_both((9, 150), torch.float32, 0.1, steps=4, block_range=(4, geom.num_blocks - 2))


def test_default_geometry():
    run_both((3, 5000), torch.bfloat16, 0.01, steps=2, density=0.01, block=4096, bucket=2048, window=10)


@pytest.mark.parametrize("case", ["ties_in_candidates", "two_levels", "too_many_candidates", "hot_span"])
def test_topk_fast_path_and_fallback(case):
    """Default geometry (k = 41 of 4096): the top k is ranked among the candidates >= a bound when
    there are at most 64 of them, else found by the radix search. 60 equal maxima: 60 candidates,
    ties at the k-th value; 30 + 30 on two levels; 100 equal maxima: the fallback; a hot span of
    300 contiguous large entries."""

    def grads(t, n):
        gen = torch.Generator().manual_seed(t)
        g = torch.randn(n, generator=gen) * 0.01
        if t > 1:
            return g
        rows = g.view(-1, 4096)
        for r in rows:
            spots = torch.randperm(4096, generator=gen)
            if case == "ties_in_candidates":
                r[spots[:60]] = 5.0
            elif case == "two_levels":
                r[spots[:30]], r[spots[30:60]] = -6.0, 5.0
            elif case == "too_many_candidates":
                r[spots[:100]] = 5.0
            else:
                r[1000:1300] = torch.randn(300, generator=gen) * 10
        return g

    run_both((2, 4096), torch.float32, 0.0, steps=2, density=0.01, block=4096, bucket=2048, window=3, grads=grads)


@pytest.mark.parametrize("block, bucket", [(60, 12), (75, 25), (64, 1), (64, 2), (64, 64)])
def test_bucket_sizes(block, bucket):
    """Even buckets take the [buckets, bucket size] kernel (12 padded to 16 columns; the short block
    of 36 shorter than its bucket of 64 as one row), odd ones the one-row kernel."""
    run_both((4, 100), torch.bfloat16, 0.1, steps=4, block=block, bucket=bucket)


def test_optimizer_backends_agree():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(40, 30), torch.nn.GELU(), torch.nn.Linear(30, 5)).to(DEVICE)
    twin = [p.detach().clone().requires_grad_() for p in model.parameters()]
    hp = dict(lr=1e-2, weight_decay=0.01, block_size=64, quant_bucket_size=16, density=0.05, window_size=3)
    opt_t = MicroAdam(model.parameters(), backend="triton", **hp)
    opt_r = MicroAdam(twin, backend="torch", **hp)
    for _ in range(5):
        x = torch.randn(8, 40, device=DEVICE)
        loss = model(x).square().mean()
        opt_t.zero_grad()
        loss.backward()
        for p, q in zip(model.parameters(), twin):
            q.grad = p.grad.clone()
        opt_t.step()
        opt_r.step()
    for p, q in zip(model.parameters(), twin):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)
        for key in ("window_idx", "ef_codes"):
            assert torch.equal(opt_t.state[p][key], opt_r.state[q][key])


def test_largest_block():
    """Block 32768 (int16 indices' limit): the top-k search packs counts of up to 32768 in 16-bit
    fields and the compaction scan counts up to 32768 ties; all-zero and ternary gradients make
    every count reach its bound."""

    def grads(t, n):
        gen = torch.Generator().manual_seed(t)
        if t == 1:
            return torch.zeros(n)
        if t == 2:
            return torch.randint(-1, 2, (n,), generator=gen).float()
        return torch.randn(n, generator=gen)

    run_both((2, 32768), torch.bfloat16, 0.0, steps=3, density=0.01, block=32768, bucket=2048, window=3, grads=grads)


def test_a_step_batches_every_parameter_into_few_launches(monkeypatch):
    """Twelve parameters of three shapes (whole rows of blocks, and a short last block) step with
    one launch per compile-time shape and half, not one per parameter piece, and still agree
    with the reference; a non-finite gradient in one of them skips that one only."""
    launched = []

    def counting(kernel):
        class Counted:
            def __getitem__(self, grid):
                launched.append(kernel.__name__)
                return kernel[grid]

        return Counted()

    for name in ("_compress", "_update"):
        monkeypatch.setattr(triton_path, name, counting(getattr(triton_path, name)))
    gen = torch.Generator().manual_seed(5)
    shapes = [(4, 64)] * 6 + [(2, 100)] * 4 + [(256,)] * 2  # rows of 64 + 36: two block lengths
    params = [torch.randn(s, generator=gen).to(DEVICE).requires_grad_() for s in shapes]
    twins = [p.detach().clone().requires_grad_() for p in params]
    hp = dict(lr=1e-2, weight_decay=0.01, block_size=64, quant_bucket_size=16, density=0.05, window_size=3)
    opt_t, opt_r = MicroAdam(params, backend="triton", **hp), MicroAdam(twins, backend="torch", **hp)
    for step in range(3):
        for p, q in zip(params, twins):
            p.grad = torch.randn(p.shape, generator=gen).to(DEVICE)
            q.grad = p.grad.clone()
        if step == 2:
            params[7].grad[1, 3] = float("nan")
            twins[7].grad[1, 3] = float("nan")
        launched.clear()
        with pytest.warns(RuntimeWarning, match="NaN") if step == 2 else contextlib.nullcontext():
            opt_t.step()
            opt_r.step()
        # three compile-time shapes per half, whatever the number of parameters: full blocks whose
        # offsets are 16-divisible (the (4, 64) and (256,) ones), full blocks on rows of 100, and
        # the 36-element short blocks
        assert sorted(launched) == ["_compress"] * 3 + ["_update"] * 3, launched
    for p, q in zip(params, twins):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)
        for key in ("step", "window_idx", "window_val", "ef_codes", "ef_stats"):
            assert torch.equal(opt_t.state[p][key], opt_r.state[q][key]), key
