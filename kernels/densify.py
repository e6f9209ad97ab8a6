"""Triton kernel for MicroAdam's densification (the authors' ``alpha``, spec section 5).

A third pass, after the step's compress and update kernels, on the same range of whole blocks:
    p -= (lr * alpha) * dequant(e)            dense: every coordinate moves (rounded to p's dtype)
    e  = quant4((1 - alpha) * dequant(e))     bucket lo / hi recomputed
in exactly the order and fp32 operations of ``functional._densify_``, so the codes and bucket
statistics are bitwise the reference's (docs/design.md, "Densification"). One program per block;
it reads and writes the block's parameter, 4-bit codes and statistics once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from microadam_dist.functional import densify_scalars
from microadam_dist.kernels.launch_table import Launches, address, block_of, f32_field


@triton.jit
def _densify(
    table_ptr,
    rect_of_ptr,
    BLOCK: tl.constexpr,
    HALF: tl.constexpr,
    QB: tl.constexpr,
    PARAM_BF16: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """Table row: addresses (parameter, codes, statistics, the non-finite flag), scalars
    (lr * alpha, 1 - alpha) (``launch_table``)."""
    t, n, _, buckets, ef_bytes, e0, _, c0, q0 = block_of(table_ptr, rect_of_ptr, ALIGNED)
    if tl.load(address(t, 3, tl.int32, False)) == 0:  # a skipped step densifies nothing either
        _densify_block(t, n, buckets, ef_bytes, e0, c0, q0, BLOCK, HALF, QB, PARAM_BF16, ALIGNED)


@triton.jit
def _densify_block(
    t,
    n,
    buckets,
    ef_bytes,
    e0,
    c0,
    q0,
    BLOCK: tl.constexpr,
    HALF: tl.constexpr,
    QB: tl.constexpr,
    PARAM_BF16: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    codes_ptr = address(t, 1, tl.uint8, ALIGNED)
    stats_ptr = address(t, 2, tl.float32, False)
    lr_alpha = f32_field(t, 0)
    keep = f32_field(t, 1)
    bucket_size = QB
    offs = tl.arange(0, BLOCK)
    inside = offs < n

    # e = dequant(codes, lo, hi): lo + code * ((hi - lo) / 15), each operation rounded
    byte = tl.load(codes_ptr + c0 + offs // 2, mask=inside, other=0).to(tl.int32)
    code = (byte >> ((offs % 2) * 4)) & 0xF
    bucket = offs // bucket_size
    lo = tl.load(stats_ptr + 2 * (q0 + bucket), mask=inside, other=0.0)
    hi = tl.load(stats_ptr + 2 * (q0 + bucket) + 1, mask=inside, other=0.0)
    e = lo + code.to(tl.float32) * tl.div_rn(hi - lo, 15.0)

    # p -= (lr * alpha) * e, then one rounding to p's dtype (bf16: round to nearest even by bits;
    # the interpreter's casts truncate)
    if PARAM_BF16:
        param_ptr = address(t, 0, tl.int16, ALIGNED)
        bits = tl.load(param_ptr + e0 + offs, mask=inside, other=0)
        p = (bits.to(tl.int32) << 16).to(tl.float32, bitcast=True)
        p = (p - lr_alpha * e).to(tl.int32, bitcast=True)
        p = ((p + 0x7FFF + ((p >> 16) & 1)) >> 16).to(tl.int16)
        tl.store(param_ptr + e0 + offs, p, mask=inside)
    else:
        param_ptr = address(t, 0, tl.float32, ALIGNED)
        p = tl.load(param_ptr + e0 + offs, mask=inside, other=0.0)
        tl.store(param_ptr + e0 + offs, p - lr_alpha * e, mask=inside)

    # e = quant4(keep * e) per bucket, as functional.quantize_4bit
    x = tl.where(inside, e * keep, 0.0)
    codes = tl.zeros([BLOCK], dtype=tl.int32)
    for b in range(0, buckets):
        here = inside & (bucket == b)
        b_lo = tl.min(tl.where(here, x, float("inf")), axis=0)
        b_hi = tl.max(tl.where(here, x, float("-inf")), axis=0)
        u = tl.div_rn(b_hi - b_lo, 15.0)
        q = tl.floor(tl.div_rn(x - b_lo, tl.where(u > 0, u, 1.0)) + 0.5)
        q = tl.minimum(tl.maximum(q, 0.0), 15.0)
        codes = tl.where(here, q.to(tl.int32), codes)
        tl.store(stats_ptr + 2 * (q0 + b), b_lo)
        tl.store(stats_ptr + 2 * (q0 + b) + 1, b_hi)
    even, odd = tl.split(tl.reshape(codes, [HALF, 2]))
    pair = tl.arange(0, HALF)
    tl.store(codes_ptr + c0 + pair, (even | (odd << 4)).to(tl.uint8), mask=pair < ef_bytes)


def densify_triton_(jobs: list[tuple]) -> None:
    """The densification pass on many block ranges at once, run after their sparse updates have
    been written: ``jobs`` holds ``(geometry, b0, b1, param, state, cfg, flag)`` tuples (as
    ``triton_path.update_triton_``); a range whose ``flag`` (the step's non-finite flag, an int32
    scalar on the device) is set is left alone. One launch per block shape."""
    if not jobs:
        return
    launches = Launches(jobs[0][3].device)
    for geometry, b0, b1, param, state, cfg, flag in jobs:
        lr_alpha, keep = densify_scalars(cfg)
        addresses = [t.data_ptr() for t in (param, state["ef_codes"], state["ef_stats"], flag)]
        for rect in geometry.rects(b0, b1):
            block = triton.next_power_of_2(max(rect.block_len, 2))
            shape = dict(BLOCK=block, HALF=block // 2, QB=geometry.quant_bucket_size)
            launches.add(
                _densify,
                rect,
                addresses,
                (0, 1),
                dict(PARAM_BF16=param.dtype == torch.bfloat16, **shape),
                (lr_alpha, keep),
            )
    launches.launch()
