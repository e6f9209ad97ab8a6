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

from microadam_dist.functional import StepConfig, densify_scalars
from microadam_dist.geometry import Geometry

# no fused multiply-adds: lo + code * u and p - c * e are rounded twice, as PyTorch does
LAUNCH_OPTIONS = {"enable_fp_fusion": False}


@triton.jit
def _densify(
    param_ptr,
    codes_ptr,
    stats_ptr,
    flag_ptr,
    n,
    num_cols,
    buckets,
    ef_bytes,
    bucket_size,
    elem_off,
    elem_row,
    ef_off,
    ef_row,
    q_off,
    q_row,
    lr_alpha,
    keep,
    BLOCK: tl.constexpr,
    HALF: tl.constexpr,
    PARAM_BF16: tl.constexpr,
):
    if tl.load(flag_ptr) == 0:  # a skipped step (non-finite gradient) densifies nothing either
        _densify_block(
            param_ptr,
            codes_ptr,
            stats_ptr,
            n,
            num_cols,
            buckets,
            ef_bytes,
            bucket_size,
            elem_off,
            elem_row,
            ef_off,
            ef_row,
            q_off,
            q_row,
            lr_alpha,
            keep,
            BLOCK,
            HALF,
            PARAM_BF16,
        )


@triton.jit
def _densify_block(
    param_ptr,
    codes_ptr,
    stats_ptr,
    n,
    num_cols,
    buckets,
    ef_bytes,
    bucket_size,
    elem_off,
    elem_row,
    ef_off,
    ef_row,
    q_off,
    q_row,
    lr_alpha,
    keep,
    BLOCK: tl.constexpr,
    HALF: tl.constexpr,
    PARAM_BF16: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    row = pid // num_cols
    col = pid % num_cols
    e0 = elem_off + row * elem_row + col * n
    c0 = ef_off + row * ef_row + col * ef_bytes
    q0 = q_off + row * q_row + col * buckets
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
        bits = tl.load(param_ptr + e0 + offs, mask=inside, other=0)
        p = (bits.to(tl.int32) << 16).to(tl.float32, bitcast=True)
        p = (p - lr_alpha * e).to(tl.int32, bitcast=True)
        p = ((p + 0x7FFF + ((p >> 16) & 1)) >> 16).to(tl.int16)
        tl.store(param_ptr + e0 + offs, p, mask=inside)
    else:
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


def densify_triton_(
    geometry: Geometry,
    b0: int,
    b1: int,
    param: torch.Tensor,
    state: dict[str, torch.Tensor],
    cfg: StepConfig,
    flag: torch.Tensor,
) -> None:
    """The densification pass on blocks [b0, b1) (arguments as ``microadam_blocks_triton_``),
    run after the step's sparse update has been written to ``param``; nothing when ``flag`` (the
    step's non-finite flag, an int32 scalar on the device) is set."""
    lr_alpha, keep = densify_scalars(cfg)
    param_bits = param.view(torch.int16) if param.dtype == torch.bfloat16 else param
    for rect in geometry.rects(b0, b1):
        block = triton.next_power_of_2(max(rect.block_len, 2))
        _densify[(rect.num_blocks,)](
            param_bits,
            state["ef_codes"],
            state["ef_stats"],
            flag,
            rect.block_len,
            rect.num_cols,
            rect.buckets,
            rect.ef_bytes,
            geometry.quant_bucket_size,
            rect.elem_offset,
            rect.elem_row_stride,
            rect.ef_offset,
            rect.ef_row_stride,
            rect.bucket_offset,
            rect.bucket_row_stride,
            lr_alpha,
            keep,
            BLOCK=block,
            HALF=block // 2,
            PARAM_BF16=param.dtype == torch.bfloat16,
            **LAUNCH_OPTIONS,
        )
