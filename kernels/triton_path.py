"""Triton kernels for one MicroAdam step on a range of whole blocks (the GPU path).

Same contract as ``microadam_dist.functional.microadam_blocks_``: flat contiguous parameter and
gradient buffers holding exactly blocks [b0, b1) of one parameter (a whole parameter, an FSDP
shard, a ZeRO partition's slice), and that range's state. One launch per ``geometry.BlockRect`` (a
rectangle of equal-length blocks), one program per block, two passes over memory:

1. ``_compress``: reads the gradient, the 4-bit codes and the bucket statistics (the block as
   [buckets, bucket size], so each bucket's scalars are loaded and divided once); accumulates
   ``a = g + dequant(e)`` in fp32; takes the top k by the reference's rule (largest ``|a|``, ties
   to the smaller index, stored in increasing index order): a lower bound from 128 strided group
   maxima leaves at most 64 candidates in nearly every block, ranked pairwise; otherwise a radix
   search over the bits of ``|a|`` finds the k-th value; writes the ring slot (int16 indices,
   bf16 values); quantizes the residual; writes codes and statistics.
2. ``_update``: reads the window's ``min(t, m) * k`` entries of the block, sorts them by index
   (``tl.sort`` of ``index * ENTRIES + entry``), sums each index's entries with a segmented
   suffix scan (no dense M, S or U anywhere, not even per block), and applies
   ``p -= lr * c1 M / (sqrt(c2 S) + eps)`` once per distinct index (at its first entry). With
   weight decay it also scales the whole block, rounding each element once, as the reference does.

Numerics for bitwise agreement with the reference where it matters: no fused multiply-adds
(``enable_fp_fusion=False``: ``lo + code * u`` is rounded twice, as in PyTorch's separate
kernels), IEEE-rounded division and square root (``div_rn``, ``sqrt_rn``), bf16 produced by
explicit round-to-nearest-even on the fp32 bits (the interpreter's casts truncate), bf16 loaded by
bit shifts.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from microadam_dist.functional import StepConfig, bias_corrections, window_weights
from microadam_dist.geometry import Geometry
from microadam_dist.kernels.densify import densify_triton_
from microadam_dist.kernels.launch_table import Launches, address, block_of, f32_field, scalar, to_device

# top-k fast path: the bound is the k-th largest of this many group maxima, and at most this many
# candidates (entries >= the bound) are ranked pairwise; blocks with more take the radix search
TOPK_GROUPS, TOPK_CANDIDATES = 128, 64
MAX_WINDOW_ENTRIES = 8192  # window_size * k per block the update kernel handles


def supports(window_size: int, k: int) -> bool:
    """Whether the kernels take blocks of ``k`` entries per slot in a window of ``window_size``."""
    return window_size * k <= MAX_WINDOW_ENTRIES


# the addresses an ALIGNED launch hints as 16-byte aligned: gradient, codes and undo codes; parameter
COMPRESS_HINTED, UPDATE_HINTED = (0, 1, 6), (0,)


@triton.jit
def _bf16_bits_to_f32(bits):
    return (bits.to(tl.int32) << 16).to(tl.float32, bitcast=True)


@triton.jit
def _f32_to_bf16_bits(x):
    bits = x.to(tl.int32, bitcast=True)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)  # round to nearest, ties to even
    return (rounded >> 16).to(tl.int16)


@triton.jit
def _second(x, y):
    """Combine of an identity scan (associative: second(second(x, y), z) = z = second(x, second(y, z)))."""
    return y


@triton.jit
def _row_major_cumsum(x):
    """Inclusive cumsum of a [rows, cols] tensor in row-major (element) order."""
    row_total = tl.sum(x, axis=1)
    return tl.cumsum(x, axis=1) + (tl.cumsum(row_total, axis=0) - row_total)[:, None]


@triton.jit
def _load_grad(ptrs, mask, GRAD_BF16: tl.constexpr):
    """The gradient in fp32, and the bits of its magnitude (a NaN or an infinity: >= 0x7F800000)."""
    if GRAD_BF16:
        bits = tl.load(ptrs, mask=mask, other=0)
        g = _bf16_bits_to_f32(bits)
    else:
        g = tl.load(ptrs, mask=mask, other=0.0)
    # |g| as bits, whose maximum over the block is >= the exponent mask iff some value is non-finite
    return g, g.to(tl.int32, bitcast=True) & 0x7FFFFFFF


@triton.jit
def _flag_nonfinite(flag_ptr, max_mag_bits):
    """Only a block with a non-finite gradient (exponent bits all ones) writes the parameter's
    flag: every writer writes 1, so the race is benign, and the usual block costs no store."""
    tl.store(flag_ptr, 1, mask=max_mag_bits >= 0x7F800000)


@triton.jit
def _save_slot(idx_ptr, val_ptr, undo_idx_ptr, undo_val_ptr, k0, k, KP: tl.constexpr):
    """Copy the block's k entries of the ring slot about to be overwritten into the undo record;
    the barrier keeps every warp's read ahead of the top-k's first write to the slot."""
    kk = tl.arange(0, KP)
    has = kk < k
    tl.store(undo_idx_ptr + k0 + kk, tl.load(idx_ptr + k0 + kk, mask=has, other=0), mask=has)
    tl.store(undo_val_ptr + k0 + kk, tl.load(val_ptr + k0 + kk, mask=has, other=0), mask=has)
    tl.debug_barrier()


@triton.jit
def _restore(dst_ptr, src_ptr, count, TILE: tl.constexpr):
    """dst[:count] = src[:count] in tiles (the rare path of a skipped step: kept small in registers)."""
    for t in range(0, count, TILE):
        at = t + tl.arange(0, TILE)
        tl.store(dst_ptr + at, tl.load(src_ptr + at, mask=at < count), mask=at < count)


@triton.jit
def _compress_addresses(t, GRAD_BF16: tl.constexpr, ALIGNED: tl.constexpr):
    """gradient, codes, statistics, ring-slot indices and values, non-finite flag."""
    if GRAD_BF16:
        grad_ptr = address(t, 0, tl.int16, ALIGNED)
    else:
        grad_ptr = address(t, 0, tl.float32, ALIGNED)
    return (
        grad_ptr,
        address(t, 1, tl.uint8, ALIGNED),
        address(t, 2, tl.float32, False),
        address(t, 3, tl.int16, False),
        address(t, 4, tl.int16, False),
        address(t, 5, tl.int32, False),
    )


@triton.jit
def _undo_addresses(t, first, ALIGNED: tl.constexpr):
    """The undo record's codes, statistics, ring-slot indices and values, from address ``first``."""
    return (
        address(t, first, tl.uint8, ALIGNED),
        address(t, first + 1, tl.float32, False),
        address(t, first + 2, tl.int16, False),
        address(t, first + 3, tl.int16, False),
    )


@triton.jit
def _select_radix(mag, a, offs, k, idx_ptr, val_ptr, k0):
    """Top k of a whole block: the k-th largest |a| by a radix search, 2 bits per round with the
    three candidate counts packed in one int64 sum; then every entry above it and the first ties
    are compacted in index order. Returns the chosen mask."""
    thr = 0
    for shift in tl.static_range(29, 0, -2):  # bits 30..1; bit 31 of |a| is 0
        c1 = thr | (1 << shift)
        c2 = thr | (2 << shift)
        c3 = thr | (3 << shift)
        packed = (mag >= c1).to(tl.int64) | ((mag >= c2).to(tl.int64) << 16) | ((mag >= c3).to(tl.int64) << 32)
        counts = tl.sum(tl.sum(packed, axis=1), axis=0)  # each count <= 32768 fits its 16 bits
        thr = tl.where(
            (counts >> 32) >= k,
            c3,
            tl.where(((counts >> 16) & 0xFFFF) >= k, c2, tl.where((counts & 0xFFFF) >= k, c1, thr)),
        )
    c1 = thr | 1
    thr = tl.where(tl.sum(tl.sum((mag >= c1).to(tl.int32), axis=1), axis=0) >= k, c1, thr)
    above = mag > thr
    ties = mag == thr
    need = k - tl.sum(tl.sum(above.to(tl.int32), axis=1), axis=0)  # 1 <= need <= number of ties
    # one scan counts both: entries above (< k <= 32768, 15 bits) and ties (<= 32768) before each
    ranks = _row_major_cumsum(above.to(tl.int32) | (ties.to(tl.int32) << 15))
    tie_rank = ranks >> 15
    chosen = above | (ties & (tie_rank <= need))
    pos = (ranks & 0x7FFF) + tl.minimum(tie_rank, need) - 1
    tl.store(idx_ptr + k0 + pos, offs.to(tl.int16), mask=chosen)
    tl.store(val_ptr + k0 + pos, _f32_to_bf16_bits(a), mask=chosen)
    return chosen


@triton.jit
def _select_candidates(
    cand,
    mag,
    offs,
    inside,
    k,
    count,
    grad_ptr,
    codes_ptr,
    stats_ptr,
    idx_ptr,
    val_ptr,
    e0,
    k0,
    c0,
    q0,
    CAND: tl.constexpr,
    QB: tl.constexpr,
    GRAD_BF16: tl.constexpr,
):
    """Top k among count <= CAND candidates (a superset of it), CAND <= 2k: their indices are
    compacted into this block's ring slot (indices, then values as scratch), read back as one
    [CAND] tensor, their a recomputed exactly as in step 1, ranked pairwise by the unique key
    (|a| desc, index asc); the k-th key is the threshold of the whole block. Returns the chosen mask."""
    where = _row_major_cumsum(cand.to(tl.int32)) - 1
    spill = where >= k  # candidates past the k index slots go into the value slots
    scratch = tl.where(spill, val_ptr + k0 + (where - k), idx_ptr + k0 + where)
    tl.store(scratch, offs.to(tl.int16), mask=cand)
    tl.debug_barrier()  # every candidate is written before any warp reads them back
    s = tl.arange(0, CAND)
    ok = s < count
    ce = tl.load(tl.where(s >= k, val_ptr + k0 + (s - k), idx_ptr + k0 + s), mask=ok, other=0).to(tl.int32)
    tl.debug_barrier()  # every warp has read them before the slot is written
    # a of each candidate, by the operations of step 1 (bitwise the same value)
    if GRAD_BF16:
        cg = _bf16_bits_to_f32(tl.load(grad_ptr + e0 + ce, mask=ok, other=0))
    else:
        cg = tl.load(grad_ptr + e0 + ce, mask=ok, other=0.0)
    ccode = (tl.load(codes_ptr + c0 + ce // 2, mask=ok, other=0).to(tl.int32) >> ((ce % 2) * 4)) & 0xF
    clo = tl.load(stats_ptr + 2 * (q0 + ce // QB), mask=ok, other=0.0)
    chi = tl.load(stats_ptr + 2 * (q0 + ce // QB) + 1, mask=ok, other=0.0)
    ca = cg + (clo + ccode.to(tl.float32) * tl.div_rn(chi - clo, 15.0))
    # an identity scan pins cm's layout: without it the compiler recomputes the loads and the
    # division above for each of the 32 rows a thread holds on the t side of the comparison
    cm = tl.associative_scan(tl.where(ok, tl.abs(ca).to(tl.int32, bitcast=True), -1), 0, _second)
    # slots are in index order, so t beats s iff cm_t > cm_s or (cm_t == cm_s and t < s), i.e.
    # cm_t > cm_s - (t < s) (no overflow: cm >= -1; an empty slot's -1 beats no candidate);
    # t runs along axis 0, which a thread mostly holds itself (few shuffles)
    rank = tl.sum((cm[:, None] > cm[None, :] - (s[:, None] < s[None, :]).to(tl.int32)).to(tl.int32), axis=0)
    top = ok & (rank < k)
    pos = tl.cumsum(top.to(tl.int32), axis=0) - 1  # the chosen in index order
    tl.store(idx_ptr + k0 + pos, ce.to(tl.int16), mask=top)
    tl.store(val_ptr + k0 + pos, _f32_to_bf16_bits(ca), mask=top)
    last = ok & (rank == k - 1)  # the k-th key: every entry at or above it is chosen
    t_mag = tl.max(tl.where(last, cm, -1), axis=0)
    t_idx = tl.max(tl.where(last, ce, -1), axis=0)
    return inside & ((mag > t_mag) | ((mag == t_mag) & (offs <= t_idx)))


@triton.jit
def _compress(
    table_ptr,
    rect_of_ptr,
    NB: tl.constexpr,
    BS: tl.constexpr,
    QB: tl.constexpr,
    GRAD_BF16: tl.constexpr,
    TOPK_FAST: tl.constexpr,
    G: tl.constexpr,
    CAND: tl.constexpr,
    KP: tl.constexpr,
    ALIGNED: tl.constexpr,
    RADIX_FALLBACK: tl.constexpr = True,
):
    """The block as [NB, BS]: row r holds bucket r (element r * QB + j for j < QB), so every
    per-bucket quantity is a scalar of its row (one load, one division per bucket) and a row-major
    scan is a scan in element order. QB is even (pairs of 4-bit codes never straddle a bucket)."""
    t, n, k, buckets, ef_bytes, e0, k0, c0, q0 = block_of(table_ptr, rect_of_ptr, ALIGNED)
    grad_ptr, codes_ptr, stats_ptr, idx_ptr, val_ptr, flag_ptr = _compress_addresses(t, GRAD_BF16, ALIGNED)
    undo_codes_ptr, undo_stats_ptr, undo_idx_ptr, undo_val_ptr = _undo_addresses(t, 6, ALIGNED)
    rb = tl.arange(0, NB)
    jb = tl.arange(0, BS)
    offs = rb[:, None] * QB + jb[None, :]
    inside = (jb[None, :] < QB) & (offs < n)
    has_bucket = rb < buckets

    # 1. a = g + dequant(e): lo + code * u with u = (hi - lo) / 15 once per bucket; the gradient is
    #    checked for a NaN or an infinity on the way (the step's only read of it)
    g, g_mag = _load_grad(grad_ptr + e0 + offs, inside, GRAD_BF16)
    _flag_nonfinite(flag_ptr, tl.max(tl.max(g_mag, axis=1), axis=0))
    byte = tl.load(codes_ptr + c0 + offs // 2, mask=inside, other=0).to(tl.int32)
    code = (byte >> ((offs % 2) * 4)) & 0xF
    lo = tl.load(stats_ptr + 2 * (q0 + rb), mask=has_bucket, other=0.0)
    hi = tl.load(stats_ptr + 2 * (q0 + rb) + 1, mask=has_bucket, other=0.0)
    # the undo record (what this program overwrites), restored by _update if the step is skipped;
    # the code bytes are read again as bytes (cached), cheaper than regrouping the pairs
    pair = tl.arange(0, BS // 2)[None, :]
    byte_at = rb[:, None] * (QB // 2) + pair
    byte_ok = (2 * pair < QB) & (byte_at < ef_bytes)
    tl.store(undo_codes_ptr + c0 + byte_at, tl.load(codes_ptr + c0 + byte_at, mask=byte_ok), mask=byte_ok)
    tl.store(undo_stats_ptr + 2 * (q0 + rb), lo, mask=has_bucket)
    tl.store(undo_stats_ptr + 2 * (q0 + rb) + 1, hi, mask=has_bucket)
    _save_slot(idx_ptr, val_ptr, undo_idx_ptr, undo_val_ptr, k0, k, KP)
    u = tl.div_rn(hi - lo, 15.0)
    a = g + (lo[:, None] + code.to(tl.float32) * u[:, None])
    a = tl.where(inside, a, 0.0)

    # 2. top-k (the reference's rule: largest |a|, ties to the smaller index; stored in index
    #    order). |a| as int32 bits is monotonic for |a| >= 0, padding is -1.
    mag = tl.where(inside, tl.abs(a).to(tl.int32, bitcast=True), -1)
    if TOPK_FAST:
        # bound: L = the k-th largest of G strided group maxima (flat position mod G); at least k
        # entries are >= L, so every entry of the top k is a candidate (|a| >= L)
        gmax = tl.sort(tl.max(tl.reshape(mag, [NB * BS // G, G]), axis=0), descending=True)
        bound = tl.max(tl.where(tl.arange(0, G) == k - 1, gmax, -1), axis=0)
        cand = inside & (mag >= bound)
        count = tl.sum(tl.sum(cand.to(tl.int32), axis=1), axis=0)
        if count <= CAND or not RADIX_FALLBACK:  # RADIX_FALLBACK=False: kernel_cost.py's fast path
            chosen = _select_candidates(
                cand,
                mag,
                offs,
                inside,
                k,
                count,
                grad_ptr,
                codes_ptr,
                stats_ptr,
                idx_ptr,
                val_ptr,
                e0,
                k0,
                c0,
                q0,
                CAND,
                QB,
                GRAD_BF16,
            )
        else:
            chosen = _select_radix(mag, a, offs, k, idx_ptr, val_ptr, k0)
    else:
        chosen = _select_radix(mag, a, offs, k, idx_ptr, val_ptr, k0)
    a = tl.where(chosen, 0.0, a)

    # 3. quantize the residual: each bucket's lo, hi and u once, as functional.quantize_4bit
    b_lo = tl.min(tl.where(inside, a, float("inf")), axis=1)
    b_hi = tl.max(tl.where(inside, a, float("-inf")), axis=1)
    u = tl.div_rn(b_hi - b_lo, 15.0)
    q = tl.floor(tl.div_rn(a - b_lo[:, None], tl.where(u > 0, u, 1.0)[:, None]) + 0.5)
    q = tl.minimum(tl.maximum(q, 0.0), 15.0)
    codes = tl.where(inside, q.to(tl.int32), 0)
    tl.store(stats_ptr + 2 * (q0 + rb), b_lo, mask=has_bucket)
    tl.store(stats_ptr + 2 * (q0 + rb) + 1, b_hi, mask=has_bucket)
    even, odd = tl.split(tl.reshape(codes, [NB, BS // 2, 2]))
    tl.store(codes_ptr + c0 + byte_at, (even | (odd << 4)).to(tl.uint8), mask=byte_ok)


@triton.jit
def _compress_odd_buckets(
    table_ptr,
    rect_of_ptr,
    BLOCK: tl.constexpr,
    HALF: tl.constexpr,
    QB: tl.constexpr,
    GRAD_BF16: tl.constexpr,
    KP: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """``_compress`` for an odd bucket size (4-bit code pairs straddle buckets): the block as
    one row, per-element bucket statistics and a runtime loop over the buckets."""
    t, n, k, buckets, ef_bytes, e0, k0, c0, q0 = block_of(table_ptr, rect_of_ptr, ALIGNED)
    grad_ptr, codes_ptr, stats_ptr, idx_ptr, val_ptr, flag_ptr = _compress_addresses(t, GRAD_BF16, ALIGNED)
    undo_codes_ptr, undo_stats_ptr, undo_idx_ptr, undo_val_ptr = _undo_addresses(t, 6, ALIGNED)
    bucket_size = QB
    offs = tl.arange(0, BLOCK)
    inside = offs < n

    # 1. a = g + dequant(e), the gradient checked on the way
    g, g_mag = _load_grad(grad_ptr + e0 + offs, inside, GRAD_BF16)
    _flag_nonfinite(flag_ptr, tl.max(g_mag, axis=0))
    byte = tl.load(codes_ptr + c0 + offs // 2, mask=inside, other=0).to(tl.int32)
    code = (byte >> ((offs % 2) * 4)) & 0xF
    bucket = offs // bucket_size
    lo = tl.load(stats_ptr + 2 * (q0 + bucket), mask=inside, other=0.0)
    hi = tl.load(stats_ptr + 2 * (q0 + bucket) + 1, mask=inside, other=0.0)
    # the undo record, restored by _update if the step is skipped
    old_byte, _ = tl.split(tl.reshape(byte, [HALF, 2]))
    pair = tl.arange(0, HALF)
    tl.store(undo_codes_ptr + c0 + pair, old_byte.to(tl.uint8), mask=pair < ef_bytes)
    first = inside & (offs % bucket_size == 0)  # one element per bucket carries its statistics
    tl.store(undo_stats_ptr + 2 * (q0 + bucket), lo, mask=first)
    tl.store(undo_stats_ptr + 2 * (q0 + bucket) + 1, hi, mask=first)
    _save_slot(idx_ptr, val_ptr, undo_idx_ptr, undo_val_ptr, k0, k, KP)
    a = g + (lo + code.to(tl.float32) * tl.div_rn(hi - lo, 15.0))
    a = tl.where(inside, a, 0.0)

    # 2. top-k: the k-th largest |a| (as int32 bits, monotonic for |a| >= 0) by a radix search,
    #    2 bits per round with the three candidate counts packed in one int64 sum; then every
    #    entry above it and the first ties (smaller indices win) are compacted in index order
    mag = tl.where(inside, tl.abs(a).to(tl.int32, bitcast=True), -1)
    thr = 0
    for shift in tl.static_range(29, 0, -2):  # bits 30..1; bit 31 of |a| is 0
        c1 = thr | (1 << shift)
        c2 = thr | (2 << shift)
        c3 = thr | (3 << shift)
        packed = (mag >= c1).to(tl.int64) | ((mag >= c2).to(tl.int64) << 16) | ((mag >= c3).to(tl.int64) << 32)
        counts = tl.sum(packed, axis=0)  # each count <= BLOCK <= 32768 fits its 16 bits
        thr = tl.where(
            (counts >> 32) >= k,
            c3,
            tl.where(((counts >> 16) & 0xFFFF) >= k, c2, tl.where((counts & 0xFFFF) >= k, c1, thr)),
        )
    c1 = thr | 1
    thr = tl.where(tl.sum((mag >= c1).to(tl.int32), axis=0) >= k, c1, thr)
    above = mag > thr
    ties = mag == thr
    need = k - tl.sum(above.to(tl.int32), axis=0)  # 1 <= need <= number of ties
    # one scan counts both: entries above (< k <= 32768, 15 bits) and ties (<= 32768) before each
    ranks = tl.cumsum(above.to(tl.int32) | (ties.to(tl.int32) << 15), axis=0)
    tie_rank = ranks >> 15
    chosen = above | (ties & (tie_rank <= need))
    pos = (ranks & 0x7FFF) + tl.minimum(tie_rank, need) - 1
    tl.store(idx_ptr + k0 + pos, offs.to(tl.int16), mask=chosen)
    tl.store(val_ptr + k0 + pos, _f32_to_bf16_bits(a), mask=chosen)
    a = tl.where(chosen, 0.0, a)

    # 3. quantize the residual per bucket
    codes = tl.zeros([BLOCK], dtype=tl.int32)
    for b in range(0, buckets):
        here = inside & (bucket == b)
        b_lo = tl.min(tl.where(here, a, float("inf")), axis=0)
        b_hi = tl.max(tl.where(here, a, float("-inf")), axis=0)
        u = tl.div_rn(b_hi - b_lo, 15.0)
        q = tl.floor(tl.div_rn(a - b_lo, tl.where(u > 0, u, 1.0)) + 0.5)
        q = tl.minimum(tl.maximum(q, 0.0), 15.0)
        codes = tl.where(here, q.to(tl.int32), codes)
        tl.store(stats_ptr + 2 * (q0 + b), b_lo)
        tl.store(stats_ptr + 2 * (q0 + b) + 1, b_hi)
    even, odd = tl.split(tl.reshape(codes, [HALF, 2]))
    tl.store(codes_ptr + c0 + pair, (even | (odd << 4)).to(tl.uint8), mask=pair < ef_bytes)


@triton.jit
def _min_key_sum(k1, m1, s1, k2, m2, s2):
    """(smallest key, sums of m and s over the entries holding it): associative and commutative,
    so a scan gives the same result whichever way it pairs operands."""
    k = tl.minimum(k1, k2)
    return (
        k,
        tl.where(k1 == k, m1, 0.0) + tl.where(k2 == k, m2, 0.0),
        tl.where(k1 == k, s1, 0.0) + tl.where(k2 == k, s2, 0.0),
    )


@triton.jit
def _max_key_count(k1, c1, k2, c2):
    """(largest key, how many entries hold it): associative and commutative."""
    k = tl.maximum(k1, k2)
    return k, tl.where(k1 == k, c1, 0) + tl.where(k2 == k, c2, 0)


@triton.jit
def _update(
    table_ptr,
    rect_of_ptr,
    ENTRIES: tl.constexpr,
    PARAM_BF16: tl.constexpr,
    DECAY: tl.constexpr,
    BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr,
    RESTORE: tl.constexpr = True,
):
    t, n, k, buckets, ef_bytes, e0, k0, c0, q0 = block_of(table_ptr, rect_of_ptr, ALIGNED)
    skipped = 0
    if RESTORE:  # RESTORE=False: kernel_cost.py's fast path (the restore branch left out)
        skipped = tl.load(address(t, 5, tl.int32, False))
    if skipped != 0:
        # the step is skipped (a non-finite gradient somewhere in the parameter, on some rank):
        # put back what _compress overwrote; the parameter is not written
        codes_ptr = address(t, 6, tl.uint8, False)
        stats_ptr = address(t, 7, tl.float32, False)
        undo_codes_ptr, undo_stats_ptr, undo_idx_ptr, undo_val_ptr = _undo_addresses(t, 8, False)
        slot_at = scalar(t, 1) * scalar(t, 2) + k0  # slot * slot stride
        _restore(address(t, 1, tl.int16, False) + slot_at, undo_idx_ptr + k0, k, 256)
        _restore(address(t, 2, tl.int16, False) + slot_at, undo_val_ptr + k0, k, 256)
        _restore(codes_ptr + c0, undo_codes_ptr + c0, ef_bytes, 256)
        _restore(stats_ptr + 2 * q0, undo_stats_ptr + 2 * q0, 2 * buckets, 256)
    else:
        _apply_update(t, n, k, e0, k0, ENTRIES, PARAM_BF16, DECAY, BLOCK, ALIGNED)


@triton.jit
def _apply_update(
    t,
    n,
    k,
    e0,
    k0,
    ENTRIES: tl.constexpr,
    PARAM_BF16: tl.constexpr,
    DECAY: tl.constexpr,
    BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """The update of one block; its addresses and scalars are read from table row t where they are
    needed, so that they do not hold registers across the sort (a launch argument would not)."""
    idx_ptr = address(t, 1, tl.int16, False)
    filled = scalar(t, 0).to(tl.int32)
    slot_stride = scalar(t, 2)
    total = filled * k
    ent = tl.arange(0, ENTRIES)
    valid = ent < total
    idx = tl.load(idx_ptr + (ent // k) * slot_stride + k0 + ent % k, mask=valid, other=0).to(tl.int32)
    # sort the entries by (index, entry); padding sorts last (indices are < 32768)
    key = tl.sort(tl.where(valid, idx * ENTRIES + ent, 32768 * ENTRIES + ent))
    e = key % ENTRIES
    sidx = key // ENTRIES
    ok = sidx < 32768
    where = (e // k) * slot_stride + k0 + e % k
    v = _bf16_bits_to_f32(tl.load(address(t, 2, tl.int16, False) + where, mask=ok, other=0))
    w1 = tl.load(address(t, 3, tl.float32, False) + e // k, mask=ok, other=0.0)
    w2 = tl.load(address(t, 4, tl.float32, False) + e // k, mask=ok, other=0.0)
    # M and S of each index, complete at the first of its entries (a suffix scan within equal keys)
    _, m_sum, s_sum = tl.associative_scan((sidx, v * w1, v * v * w2), 0, _min_key_sum, reverse=True)
    _, seen = tl.associative_scan((sidx, tl.full([ENTRIES], 1, tl.int32)), 0, _max_key_count)
    write = ok & (seen == 1)  # one write per distinct index
    c1 = f32_field(t, 4)
    c2 = f32_field(t, 5)
    upd = tl.div_rn(m_sum * c1, tl.sqrt_rn(s_sum * c2) + f32_field(t, 6))
    lr = f32_field(t, 3)
    if PARAM_BF16:
        param_ptr = address(t, 0, tl.int16, ALIGNED)
    else:
        param_ptr = address(t, 0, tl.float32, ALIGNED)
    if PARAM_BF16:
        p = _bf16_bits_to_f32(tl.load(param_ptr + e0 + sidx, mask=write, other=0))
    else:
        p = tl.load(param_ptr + e0 + sidx, mask=write, other=0.0)
    if DECAY:
        # dense decay, rounded once together with the update: the entries' old values are read
        # above; every element is written decayed, then (after a barrier) the entries
        decay = f32_field(t, 7)
        p = p * decay
        tl.debug_barrier()  # every warp has read its entries before any warp writes the block
        offs = tl.arange(0, BLOCK)
        if PARAM_BF16:
            block = _bf16_bits_to_f32(tl.load(param_ptr + e0 + offs, mask=offs < n, other=0))
            tl.store(param_ptr + e0 + offs, _f32_to_bf16_bits(block * decay), mask=offs < n)
        else:
            block = tl.load(param_ptr + e0 + offs, mask=offs < n, other=0.0)
            tl.store(param_ptr + e0 + offs, block * decay, mask=offs < n)
        tl.debug_barrier()
    if PARAM_BF16:
        tl.store(param_ptr + e0 + sidx, _f32_to_bf16_bits(p - lr * upd), mask=write)
    else:
        tl.store(param_ptr + e0 + sidx, p - lr * upd, mask=write)


def _check_buffers(t: torch.Tensor, what: str) -> None:
    if t.dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"the Triton path takes fp32 or bf16 parameters and gradients, got a {t.dtype} {what}")
    if not t.is_contiguous():
        raise ValueError(f"the Triton path needs a contiguous {what} buffer")


def _check_state(state: dict[str, torch.Tensor]) -> None:
    if state["window_idx"].stride(1) != 1 or state["ef_codes"].stride(0) != 1 or not state["ef_stats"].is_contiguous():
        raise ValueError("the Triton path needs state tensors whose last dimension is contiguous")


def _check_entries(window_size: int, k: int) -> None:
    if not supports(window_size, k):
        raise ValueError(
            f"the Triton path handles window_size * k <= {MAX_WINDOW_ENTRIES} entries per "
            f"block, got {window_size} * {k}; use backend='torch' or a smaller density/block_size"
        )


def compress_triton_(jobs: list[tuple]) -> list[dict[str, torch.Tensor]]:
    """The first half of a step for many block ranges at once: ``jobs`` holds ``(geometry, b0, b1,
    grad, state, cfg, flag)`` tuples (arguments as ``microadam_blocks_triton_``, plus ``flag``, an
    int32 scalar on the device, set to 1 when that gradient holds a NaN or an infinity). The step's
    one read of each gradient: writes the new ring slot, codes and bucket statistics, and returns
    per job the undo record (the slot entries, codes and statistics overwritten) that
    ``update_triton_`` restores from when a step is skipped. A few launches in all; no host sync."""
    undos = []
    launches = Launches(jobs[0][3].device if jobs else torch.device("cpu"))
    for geometry, b0, b1, grad, state, cfg, flag in jobs:
        _check_buffers(grad, "gradient")
        _check_state(state)
        slot = (cfg.step - 1) % cfg.window_size
        idx_slot, val_slot = state["window_idx"][slot], state["window_val"][slot].view(torch.int16)
        undo = {
            "ef_codes": torch.empty_like(state["ef_codes"]),
            "ef_stats": torch.empty_like(state["ef_stats"]),
            "window_idx": torch.empty_like(idx_slot),
            "window_val": torch.empty_like(val_slot),
        }
        undos.append(undo)
        addresses = [
            t.data_ptr()
            for t in (
                grad,
                state["ef_codes"],
                state["ef_stats"],
                idx_slot,
                val_slot,
                flag,
                undo["ef_codes"],
                undo["ef_stats"],
                undo["window_idx"],
                undo["window_val"],
            )
        ]
        qb, bf16 = geometry.quant_bucket_size, grad.dtype == torch.bfloat16
        for rect in geometry.rects(b0, b1):
            n, k = rect.block_len, rect.k
            _check_entries(cfg.window_size, k)
            if qb % 2 == 0:  # a row of [buckets, bucket size] per bucket
                nb, bs = triton.next_power_of_2(rect.buckets), triton.next_power_of_2(min(qb, max(n, 2)))
                groups = min(TOPK_GROUPS, nb * bs)
                cand = min(TOPK_CANDIDATES, 1 << (2 * k).bit_length() - 1)  # a power of two <= 2k
                shape = dict(NB=nb, BS=bs, QB=qb, TOPK_FAST=k <= min(groups, cand), G=groups, CAND=cand)
                constexprs = dict(GRAD_BF16=bf16, KP=triton.next_power_of_2(k), **shape)
                launches.add(_compress, rect, addresses, COMPRESS_HINTED, constexprs)
            else:
                block = triton.next_power_of_2(max(n, 2))
                shape = dict(BLOCK=block, HALF=block // 2, QB=qb, GRAD_BF16=bf16, KP=triton.next_power_of_2(k))
                launches.add(_compress_odd_buckets, rect, addresses, COMPRESS_HINTED, shape)
    launches.launch()
    return undos


def update_triton_(jobs: list[tuple]) -> None:
    """The second half for many block ranges at once: ``jobs`` holds ``(geometry, b0, b1, param,
    state, cfg, flag, undo)`` tuples. The sparse update from the window (then the densification
    when alpha is set); or, where ``flag`` is set (read on the device), the state put back from
    ``undo`` and the parameter left as it was."""
    if not jobs:
        return
    device = jobs[0][3].device
    # every job's window weights (b1^q and b2^q per filled slot) in one device buffer
    weights, at = [], []
    for _, _, _, param, _, cfg, _, _ in jobs:
        _check_buffers(param, "parameter")
        _, _, w1, w2 = window_weights(cfg, "cpu")
        at.append(len(weights))
        weights += w1.tolist() + w2.tolist()
    weights = to_device(torch.tensor(weights, dtype=torch.float32), device)
    launches = Launches(device)
    for (geometry, b0, b1, param, state, cfg, flag, undo), w in zip(jobs, at):
        win_idx, win_val = state["window_idx"], state["window_val"]
        slot, filled = (cfg.step - 1) % cfg.window_size, min(cfg.step, cfg.window_size)
        c1, c2 = bias_corrections(cfg.step, cfg.beta1, cfg.beta2)
        base = weights.data_ptr() + 4 * w
        addresses = [param.data_ptr(), win_idx.data_ptr(), win_val.data_ptr(), base, base + 4 * filled]
        addresses += [t.data_ptr() for t in (flag, state["ef_codes"], state["ef_stats"])]
        addresses += [undo[key].data_ptr() for key in ("ef_codes", "ef_stats", "window_idx", "window_val")]
        scalars = [float(cfg.lr), c1, c2, float(cfg.eps), 1.0 - cfg.lr * cfg.weight_decay]
        scalars = [filled, slot, win_idx.stride(0), *scalars]  # _update's order
        for rect in geometry.rects(b0, b1):
            block = triton.next_power_of_2(max(rect.block_len, 2))
            entries = triton.next_power_of_2(max(filled * rect.k, 2))
            shape = dict(ENTRIES=entries, PARAM_BF16=param.dtype == torch.bfloat16, DECAY=cfg.weight_decay != 0.0)
            # one warp sorts and scans <= 1024 entries with shuffles only (no shared-memory rounds):
            # 50 instead of 72 thread-instructions per element at the default geometry
            warps = 1 if block <= 4096 and entries <= 1024 else 4
            launches.add(_update, rect, addresses, UPDATE_HINTED, dict(BLOCK=block, **shape), scalars, num_warps=warps)
    launches.launch()
    # the authors' densification: one more pass (kernels/densify.py)
    densify_triton_([job[:7] for job in jobs if job[5].alpha != 0.0])


def microadam_blocks_triton_(
    geometry: Geometry,
    b0: int,
    b1: int,
    param: torch.Tensor,
    grad: torch.Tensor,
    state: dict[str, torch.Tensor],
    cfg: StepConfig,
) -> None:
    """The Triton path of ``functional.microadam_blocks_`` (same arguments, same results): both
    halves. A gradient with a NaN or an infinity leaves state and parameter as they were."""
    flag = torch.zeros((), dtype=torch.int32, device=param.device)
    (undo,) = compress_triton_([(geometry, b0, b1, grad, state, cfg, flag)])
    update_triton_([(geometry, b0, b1, param, state, cfg, flag, undo)])
