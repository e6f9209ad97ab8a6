"""The PyTorch reference against the spec's AdamW oracle and an independent naive implementation."""

import math

import numpy as np
import pytest
import torch
from naive_microadam import NaiveMicroAdam

from microadam_dist import MicroAdam, geometry_for
from microadam_dist.functional import (
    StepConfig,
    _level_step,
    dequantize_4bit,
    microadam_blocks_,
    quantize_4bit,
    select_topk,
)
from microadam_dist.state import StateLayout

SHAPES = [(33, 70), (5,), (), (3, 4, 50), (2, 300), (130,)]


def bf16_exact(shape, gen):
    """Gradients exactly representable in bf16, so the bf16 window stores them without error."""
    return torch.randn(shape, generator=gen).bfloat16().float()


# ---- spec oracle: density 1 and t <= window_size is AdamW -------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_oracle_fp32(shape, weight_decay):
    gen = torch.Generator().manual_seed(1)
    p0 = torch.randn(shape, generator=gen)
    ref = p0.clone().requires_grad_()
    mine = p0.clone().requires_grad_()
    adamw = torch.optim.AdamW([ref], lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=weight_decay)
    micro = MicroAdam(
        [mine],
        lr=1e-2,
        betas=(0.9, 0.99),
        eps=1e-8,
        weight_decay=weight_decay,
        window_size=10,
        density=1.0,
        block_size=64,
        quant_bucket_size=16,
    )
    for _ in range(10):
        g = bf16_exact(shape, gen)
        ref.grad, mine.grad = g.clone(), g.clone()
        adamw.step()
        micro.step()
        # same formula, different fp32 operation order: a few ulps of a parameter of size ~1
        torch.testing.assert_close(mine, ref, rtol=0, atol=2e-6)
    assert micro.state[mine]["ef_codes"].eq(0).all()  # density 1 leaves no residual


@pytest.mark.parametrize("shape", SHAPES)
def test_adamw_oracle_bf16(shape):
    """bf16 params: MicroAdam rounds once per step, so compare with AdamW on an fp32 copy
    rounded to bf16 after every step; the two may differ by one bf16 ulp where fp32 operation
    order lands on a rounding boundary."""
    gen = torch.Generator().manual_seed(2)
    p0 = torch.randn(shape, generator=gen).bfloat16()
    ref = p0.float().requires_grad_()
    mine = p0.clone().requires_grad_()
    adamw = torch.optim.AdamW([ref], lr=1e-2, weight_decay=0.1)
    micro = MicroAdam([mine], lr=1e-2, weight_decay=0.1, density=1.0, block_size=64, quant_bucket_size=16)
    for _ in range(10):
        g = bf16_exact(shape, gen)
        ref.grad, mine.grad = g.clone(), g.bfloat16()
        adamw.step()
        micro.step()
        with torch.no_grad():
            ref.copy_(ref.bfloat16().float())
        ulp = torch.finfo(torch.bfloat16).eps * ref.detach().abs().clamp_min(1e-3)
        assert ((mine.float() - ref).abs() <= ulp).all()
        assert mine.dtype == torch.bfloat16


# ---- independent naive implementation -----------------------------------------------------------
NAIVE_SHAPES = [(7, 100), (3, 50), (5,), (130,), (2, 3, 40), ()]


@pytest.mark.parametrize("alpha", [0.0, 0.4])  # 0.4: the authors' densification (spec section 5)
def test_matches_naive_implementation_step_by_step(alpha):
    hp = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05)
    geo = dict(window_size=4, density=0.05, block_size=64, quant_bucket_size=16)
    gen = torch.Generator().manual_seed(3)
    params = [torch.randn(s, generator=gen).requires_grad_() for s in NAIVE_SHAPES]
    naive = [
        NaiveMicroAdam(
            s,
            hp["lr"],
            hp["betas"],
            hp["eps"],
            hp["weight_decay"],
            geo["window_size"],
            geo["density"],
            geo["block_size"],
            geo["quant_bucket_size"],
            alpha=alpha,
        )
        for s in NAIVE_SHAPES
    ]
    naive_p = [p.detach().double().reshape(-1).numpy().copy() for p in params]
    opt = MicroAdam(params, **hp, **geo, alpha=alpha)
    for step in range(1, 23):  # window 4: the ring wraps five times
        for i, p in enumerate(params):
            g = torch.randn(p.shape, generator=gen)
            if step == 1 and p.dim() == 2 and p.shape[0] == 3:
                g[0] = 0.25  # a block of exact ties: the smallest indices must win
                g[1] = 0.0  # an all-zero block: its buckets are constant
            p.grad = g
            naive_p[i] = naive[i].step(naive_p[i], g.reshape(-1).numpy())
        opt.step()
        for i, p in enumerate(params):
            # float64 moments and params against fp32: fp32 rounding of ~1e-7 per step
            np.testing.assert_allclose(p.detach().reshape(-1).numpy(), naive_p[i], rtol=1e-5, atol=1e-6)
            st, want = opt.state[p], naive[i].flat_state()
            assert int(st["step"]) == step
            np.testing.assert_array_equal(st["window_idx"].numpy(), want["window_idx"])
            np.testing.assert_array_equal(st["window_val"].float().numpy(), want["window_val"])
            np.testing.assert_array_equal(st["ef_codes"].numpy(), want["ef_codes"])
            np.testing.assert_array_equal(st["ef_stats"].numpy(), want["ef_stats"])
    # the error feedback was really exercised
    assert any(opt.state[p]["ef_codes"].ne(0).any() for p in params)


# ---- pieces of the math ---------------------------------------------------------------------------
@pytest.mark.parametrize("value", [0.0, 1.5, -3.25, 1e30])
def test_quantization_exact_on_constant_buckets(value):
    x = torch.full((3, 40), value)
    codes, stats = quantize_4bit(x, 16)
    assert codes.eq(0).all()
    assert torch.equal(dequantize_4bit(codes, stats, 40, 16), x)


def test_quantization_error_bounded_and_layout():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(5, 37, generator=gen)  # 37: odd length, ragged last bucket
    codes, stats = quantize_4bit(x, 16)
    assert codes.shape == (5, 19) and stats.shape == (5, 3, 2)
    u = (stats[..., 1] - stats[..., 0]) / 15
    err = (dequantize_4bit(codes, stats, 37, 16) - x).abs()
    bound = u.repeat_interleave(16, dim=1)[:, :37] / 2 * (1 + 1e-5)
    assert (err <= bound + 1e-7).all()
    # min and max of each bucket are reproduced exactly (codes 0 and 15)
    for b in range(3):
        seg = x[:, 16 * b : 16 * (b + 1)]
        assert torch.equal(stats[:, b, 0], seg.amin(1)) and torch.equal(stats[:, b, 1], seg.amax(1))
    low, high = codes & 0xF, codes >> 4
    assert low.max() <= 15 and high[:, -1].eq(0).all()  # the padding nibble of an odd block is 0


def test_select_topk_ties_and_order():
    a = torch.tensor([[0.0, 2.0, -2.0, 1.0, 2.0, 0.0]])
    assert select_topk(a, 3).tolist() == [[1, 2, 4]]  # |a| = 2 three times: smaller index first
    assert select_topk(torch.zeros(1, 6), 2).tolist() == [[0, 1]]
    b = torch.tensor([[0.5, -3.0, 1.0, 2.0, -0.1]])
    assert select_topk(b, 3).tolist() == [[1, 2, 3]]  # the 3 largest |a|, in increasing index order
    assert select_topk(b, 5).tolist() == [[0, 1, 2, 3, 4]]


# ---- the core runs on any block range (a shard) and in any chunking -----------------------------
def _run_range(shape, ranges, steps, chunk):
    geom = geometry_for(shape, 64, 16, 0.05)
    gen = torch.Generator().manual_seed(5)
    p = torch.randn(math.prod(shape), generator=gen)
    # one state tensor set, each range stepping on its slices (views, as an engine's flat state)
    whole = StateLayout(geom, 3).zeros("cpu")
    states = []
    for b0, b1 in ranges:
        (_, k0, e0, q0), (_, k1, e1, q1) = geom.block_start(b0), geom.block_start(b1)
        states.append(
            {
                "window_idx": whole["window_idx"][:, k0:k1],
                "window_val": whole["window_val"][:, k0:k1],
                "ef_codes": whole["ef_codes"][e0:e1],
                "ef_stats": whole["ef_stats"][q0:q1],
            }
        )
    for t in range(1, steps + 1):
        g = torch.randn(math.prod(shape), generator=gen)
        cfg = StepConfig(
            lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, window_size=3, step=t, chunk_elements=chunk
        )
        for (b0, b1), st in zip(ranges, states):
            e0, e1 = geom.block_start(b0)[0], geom.block_start(b1)[0]
            piece = p[e0:e1]  # a contiguous view: updated in place
            microadam_blocks_(geom, b0, b1, piece, g[e0:e1], st, cfg)
    whole.pop("step")
    return p, whole


@pytest.mark.parametrize("shape", [(9, 150), (700,), (4, 3, 30)])
def test_block_ranges_and_chunks_are_bitwise_equal_to_whole(shape):
    geom = geometry_for(shape, 64, 16, 0.05)
    nb = geom.num_blocks
    whole_p, whole_s = _run_range(shape, [(0, nb)], 7, 1 << 20)
    cuts = sorted({0, nb, 1, nb // 3, nb // 2 + 1, nb - 1})
    ranges = list(zip(cuts[:-1], cuts[1:]))
    for chunk in (1 << 20, 100, 1):
        p, s = _run_range(shape, ranges, 7, chunk)
        assert torch.equal(p, whole_p)
        for k in whole_s:
            assert torch.equal(s[k], whole_s[k]), k


def test_select_fast_path_equals_the_key_rule():
    """The float top-k fast path picks exactly what the unique-key rule picks, ties and NaN too."""
    from microadam_dist.functional import _select_by_key

    gen = torch.Generator().manual_seed(6)
    for trial in range(200):
        n = int(torch.randint(1, 300, (), generator=gen))
        k = int(torch.randint(1, n + 1, (), generator=gen))
        a = torch.randn(7, n, generator=gen)
        if trial % 3 == 0:
            a = torch.randint(-3, 4, (7, n), generator=gen).float()  # many exact ties
        if trial % 7 == 0:
            a[0, :3] = float("nan")
        if trial % 5 == 0:
            a[1] = 0.0
            a[2, ::2] = -0.0
        assert torch.equal(select_topk(a, k), _select_by_key(a, k)), (n, k)


@pytest.mark.parametrize("device", ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
def test_level_step_is_ieee_division(device):
    # x * fp32(1/15), what CUDA computes for x / 15 (a Python number), is one ulp off for many x
    x = torch.linspace(0.1, 100.0, 1000)
    exact = torch.from_numpy((x.numpy().astype(np.float64) / 15).astype(np.float32))
    assert not torch.equal(x * torch.tensor(1 / 15, dtype=torch.float32), exact)  # the test can tell
    assert torch.equal(_level_step(torch.zeros_like(x).to(device), x.to(device)).cpu(), exact)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compares the reference on CUDA with CPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_state_same_on_cuda_and_cpu(dtype):
    """Property: the math does not depend on the device. State bitwise; parameters within fp32
    summation order (CUDA's scatter_add adds a repeated index's window entries in any order)."""
    geom = geometry_for((5, 3000), 1024, 256, 0.02)
    gen = torch.Generator().manual_seed(3)
    params = {d: torch.randn(geom.numel, generator=gen).to(dtype).to(d) for d in ("cpu", "cuda")}
    params["cuda"].copy_(params["cpu"])
    states = {d: StateLayout(geom, 4).zeros(d) for d in params}
    for t in range(1, 11):
        g = torch.randn(geom.numel, generator=gen).to(dtype)
        cfg = StepConfig(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, window_size=4, step=t)
        for d in params:
            microadam_blocks_(geom, 0, geom.num_blocks, params[d], g.to(d), states[d], cfg)
        for key, value in states["cpu"].items():
            assert torch.equal(states["cuda"][key].cpu(), value), (key, t)
        torch.testing.assert_close(
            params["cuda"].cpu(), params["cpu"], rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-6
        )
