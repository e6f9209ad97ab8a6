"""The MicroAdam math in pure PyTorch: the executable form of the spec, and the CPU path.

One step of one block range (see ``microadam_blocks_``) is:
  1. a = g + dequant(e)                        accumulate the 4-bit error feedback (fp32)
  2. per block, the k entries of largest |a| go into ring slot (t - 1) mod m
  3. a[selected] = 0; e = quant4(a)            the residual becomes the error feedback
  4. p *= 1 - lr * weight_decay                decoupled weight decay
  5. p -= lr * c1 * M / (sqrt(c2 * S) + eps)   M, S rebuilt from the window
  7. with 0 < alpha < 1 (the authors' densification, spec section 5), a dense pass after the
     parameter is written: p -= (lr * alpha) * dequant(e); e = quant4((1 - alpha) * dequant(e))
Work is done rect by rect (geometry.BlockRect) and in chunks of at most ``chunk_elements``
elements, so no temporary grows with the parameter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .geometry import BlockRect, Geometry

QUANT_LEVELS = 15  # 4 bits: codes 0..15
INDEX_BITS = 15  # block-local indices < 32768 fit in int16 and in the low bits of a select key


@dataclass(frozen=True)
class StepConfig:
    """Everything one step of one parameter needs besides tensors."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    window_size: int
    step: int  # t, already incremented: the first step has t = 1
    chunk_elements: int = 1 << 20
    alpha: float = 0.0  # densification (spec section 5); 0 is the plain algorithm

    @classmethod
    def from_group(cls, group: dict, step: int, chunk_elements: int = 1 << 20) -> "StepConfig":
        """The step of a parameter of ``group`` (a param group) whose step count becomes ``step``."""
        return cls(
            lr=group["lr"],
            beta1=group["betas"][0],
            beta2=group["betas"][1],
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            window_size=group["window_size"],
            step=step,
            chunk_elements=chunk_elements,
            alpha=group.get("alpha", 0.0),
        )


def densify_scalars(cfg: StepConfig) -> tuple[float, float]:
    """(lr * alpha, 1 - alpha) rounded to fp32 once, the factors every path multiplies by, so a
    kernel that takes fp32 arguments and PyTorch's fp32 arithmetic see the same numbers."""
    f32 = lambda x: float(torch.tensor(x, dtype=torch.float32))  # noqa: E731
    return f32(cfg.lr * cfg.alpha), f32(1.0 - cfg.alpha)


# ---- 4-bit error feedback -----------------------------------------------------------------------
def _pad_to_buckets(x: torch.Tensor, bucket: int) -> torch.Tensor:
    """Pad the last dim to a multiple of ``bucket`` by repeating the last column.

    Repeating an existing value leaves every bucket's min and max unchanged.
    """
    n = x.shape[-1]
    pad = -n % bucket
    if pad == 0:
        return x
    return torch.cat([x, x[..., -1:].expand(*x.shape[:-1], pad)], dim=-1)


def _level_step(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """u = (hi - lo) / 15, IEEE-rounded on every device.

    Dividing a CUDA tensor by a Python number multiplies by its reciprocal instead (one ulp off
    now and then), so the divisor is a tensor on the same device.
    """
    return (hi - lo).div_(torch.full((), QUANT_LEVELS, dtype=hi.dtype, device=hi.device))


def quantize_4bit(x: torch.Tensor, bucket: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize rows of ``x`` (fp32, [N, n]) per bucket of ``bucket`` elements.

    Returns packed codes ([N, ceil(n / 2)] uint8: element 2i in the low nibble, 2i + 1 in the
    high one) and statistics ([N, ceil(n / bucket), 2] fp32: lo = min, hi = max).
    code = clamp(floor((x - lo) / u + 0.5), 0, 15) with u = (hi - lo) / 15; a bucket with
    hi == lo gets code 0 everywhere and so dequantizes exactly to lo.
    """
    rows, n = x.shape
    xb = _pad_to_buckets(x, bucket).view(rows, -1, bucket)
    lo = xb.amin(dim=-1, keepdim=True)
    hi = xb.amax(dim=-1, keepdim=True)
    u = _level_step(lo, hi)
    # where hi == lo every element equals lo, so (x - lo) / 1 = 0 gives code 0 with no 0 / 0
    q = (xb - lo).div_(torch.where(u > 0, u, 1.0)).add_(0.5).floor_().clamp_(0, QUANT_LEVELS)
    codes = q.view(rows, -1)[:, :n].to(torch.uint8)
    if n % 2:
        codes = torch.cat([codes, codes.new_zeros(rows, 1)], dim=1)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return packed, torch.cat([lo, hi], dim=-1)


def dequantize_4bit(packed: torch.Tensor, stats: torch.Tensor, n: int, bucket: int) -> torch.Tensor:
    """Inverse of ``quantize_4bit``: x' = lo + code * (hi - lo) / 15, as fp32 [N, n]."""
    rows = packed.shape[0]
    codes = torch.stack([packed & 0xF, packed >> 4], dim=-1).view(rows, -1)[:, :n]
    codes = _pad_to_buckets(codes, bucket).view(rows, -1, bucket).float()
    lo, hi = stats[..., 0:1], stats[..., 1:2]
    x = lo + codes * _level_step(lo, hi)
    return x.view(rows, -1)[:, :n]


# ---- top-k selection ----------------------------------------------------------------------------
def _select_by_key(a: torch.Tensor, k: int) -> torch.Tensor:
    n = a.shape[1]
    key = a.abs().view(torch.int32).to(torch.int64) << INDEX_BITS
    key |= torch.arange(n - 1, -1, -1, device=a.device, dtype=torch.int64)
    top = key.topk(k, dim=1, sorted=False).values
    return ((n - 1) - (top & ((1 << INDEX_BITS) - 1))).sort(dim=1).values


def select_topk(a: torch.Tensor, k: int) -> torch.Tensor:
    """Block-local indices of the k entries of largest |a| in each row of ``a`` ([N, n] fp32).

    The rule: ties go to the smaller index, and each row's k indices are returned in increasing
    order, so every correct implementation writes the same bytes (a GPU kernel that finds a
    threshold and compacts the entries above it produces that order for free). It is the top-k of
    the key ``(bits(|a|) << 15) | (n - 1 - i)`` (the bits of a non-negative float are monotonic),
    which is unique per entry. Fast path: a float top-k of k + 1 values settles every row whose
    k-th and (k+1)-th magnitudes differ; rows with a tie (or a NaN) there take the key path.
    """
    n = a.shape[1]
    if k == n:
        return _select_by_key(a, k)
    vals, idx = a.abs().topk(k + 1, dim=1, sorted=True)
    kth, nxt = vals[:, k - 1], vals[:, k]
    exact_rows = ((kth == nxt) | kth.isnan() | nxt.isnan()).nonzero().squeeze(1)
    out = idx[:, :k].sort(dim=1).values
    if exact_rows.numel():
        out[exact_rows] = _select_by_key(a[exact_rows], k)
    return out


# ---- strided views of one rect's chunk -------------------------------------------------------
def _view(t: torch.Tensor, offset: int, size, stride) -> torch.Tensor:
    return t.as_strided(size, stride, t.storage_offset() + offset)


def _chunks(rect: BlockRect, chunk_elements: int):
    """Sub-rectangles (row0, rows, col0, cols) of ``rect`` with at most ~chunk_elements elements."""
    row_elems = rect.num_cols * rect.block_len
    if row_elems <= chunk_elements:
        step = max(1, chunk_elements // row_elems)
        for r in range(0, rect.num_rows, step):
            yield r, min(step, rect.num_rows - r), 0, rect.num_cols
    else:
        step = max(1, chunk_elements // rect.block_len)
        for r in range(rect.num_rows):
            for c in range(0, rect.num_cols, step):
                yield r, 1, c, min(step, rect.num_cols - c)


class _ChunkViews:
    """Views of the param, grad and state tensors for one chunk: blocks shaped [rows, cols, ...]."""

    def __init__(self, rect: BlockRect, r0: int, nr: int, c0: int, nc: int, param, grad, state):
        p = rect
        n, k = p.block_len, p.k
        e_off = p.elem_offset + r0 * p.elem_row_stride + c0 * n
        k_off = p.k_offset + r0 * p.k_row_stride + c0 * k
        ef_off = p.ef_offset + r0 * p.ef_row_stride + c0 * p.ef_bytes
        q_off = p.bucket_offset + r0 * p.bucket_row_stride + c0 * p.buckets
        self.num_blocks = nr * nc
        self.param = _view(param, e_off, (nr, nc, n), (p.elem_row_stride, n, 1))
        self.grad = _view(grad, e_off, (nr, nc, n), (p.elem_row_stride, n, 1))
        # window tensors may be column slices of a larger [m, K] tensor: step over slots by stride
        wi, wv = state["window_idx"], state["window_val"]
        self.win_idx = _view(wi, k_off, (wi.shape[0], nr, nc, k), (wi.stride(0), p.k_row_stride, k, 1))
        self.win_val = _view(wv, k_off, (wv.shape[0], nr, nc, k), (wv.stride(0), p.k_row_stride, k, 1))
        self.ef_codes = _view(state["ef_codes"], ef_off, (nr, nc, p.ef_bytes), (p.ef_row_stride, p.ef_bytes, 1))
        self.ef_stats = _view(
            state["ef_stats"], 2 * q_off, (nr, nc, p.buckets, 2), (2 * p.bucket_row_stride, 2 * p.buckets, 2, 1)
        )


def _flat_blocks(t: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """[rows, cols, ...] -> [rows * cols, ...] (a copy only when the view is not contiguous)."""
    return t.reshape(num_blocks, *t.shape[2:])


# ---- one step on a range of whole blocks --------------------------------------------------------
def microadam_blocks_(
    geometry: Geometry,
    b0: int,
    b1: int,
    param: torch.Tensor,
    grad: torch.Tensor,
    state: dict[str, torch.Tensor],
    cfg: StepConfig,
) -> None:
    """One MicroAdam step, in place, on blocks [b0, b1) of one parameter.

    ``param`` and ``grad`` are flat contiguous tensors holding exactly the elements of those blocks
    (any floating dtype); ``state`` holds the state of exactly those blocks (``state.StateLayout``): its
    tensors may be views into larger ones (window tensors sliced along dim 1, the others along
    dim 0), as long as their last dimension is contiguous.
    """
    slot, filled, w1, w2 = window_weights(cfg, param.device)
    w1, w2 = w1.view(-1, 1, 1), w2.view(-1, 1, 1)
    decay = 1.0 - cfg.lr * cfg.weight_decay
    c1, c2 = bias_corrections(cfg.step, cfg.beta1, cfg.beta2)
    device = param.device
    bucket = geometry.quant_bucket_size

    rects = geometry.rects(b0, b1)
    # M and S scratch for the largest chunk, zero between chunks (only touched entries are reset)
    largest = max((min(p.numel, max(cfg.chunk_elements, p.block_len)) for p in rects), default=0)
    scratch = torch.zeros(2, largest, dtype=torch.float32, device=device)
    for rect in rects:
        n, k = rect.block_len, rect.k
        for r0, nr, c0, nc in _chunks(rect, cfg.chunk_elements):
            v = _ChunkViews(rect, r0, nr, c0, nc, param, grad, state)
            nb = v.num_blocks
            # 1. accumulate the error feedback
            codes = _flat_blocks(v.ef_codes, nb)
            stats = _flat_blocks(v.ef_stats, nb)
            a = _flat_blocks(v.grad, nb).float() + dequantize_4bit(codes, stats, n, bucket)
            # 2. top-k into the ring slot
            idx = select_topk(a, k)
            v.win_idx[slot].copy_(idx.view(nr, nc, k))
            v.win_val[slot].copy_(a.gather(1, idx).view(nr, nc, k))
            # 3. the residual becomes the new error feedback
            a.scatter_(1, idx, 0.0)
            new_codes, new_stats = quantize_4bit(a, bucket)
            v.ef_codes.copy_(new_codes.view(nr, nc, -1))
            v.ef_stats.copy_(new_stats.view(nr, nc, -1, 2))
            del a, codes, stats, new_codes, new_stats
            # 5. M and S at the window's indices: summed in zeroed scratch (an index may sit in
            #    several slots), read back at those indices only, the scratch zeroed again
            win_idx = v.win_idx[:filled].reshape(filled, nb, k).long()
            win_val = v.win_val[:filled].reshape(filled, nb, k).float()
            flat_idx = win_idx.permute(1, 0, 2).reshape(nb, filled * k)
            m_sum, s_sum = scratch.view(2, -1)[:, : nb * n].view(2, nb, n).unbind(0)
            m_sum.scatter_add_(1, flat_idx, (win_val * w1).permute(1, 0, 2).reshape(nb, filled * k))
            s_sum.scatter_add_(1, flat_idx, (win_val * win_val * w2).permute(1, 0, 2).reshape(nb, filled * k))
            m_at, s_at = m_sum.gather(1, flat_idx), s_sum.gather(1, flat_idx)
            m_sum.scatter_(1, flat_idx, 0.0)
            s_sum.scatter_(1, flat_idx, 0.0)
            update = m_at.mul_(c1).div_(s_at.mul_(c2).sqrt_().add_(cfg.eps))  # U, zero elsewhere
            del win_idx, win_val, s_at
            # 4 + 6. decoupled weight decay (dense), then the sparse update; one rounding to the
            #    parameter's dtype (an index repeated across slots writes the same value twice)
            p = _flat_blocks(v.param, nb).float()
            if cfg.weight_decay != 0.0:
                p.mul_(decay)
            p.scatter_(1, flat_idx, p.gather(1, flat_idx).add_(update, alpha=-cfg.lr))
            if p.data_ptr() != v.param.data_ptr():  # p was a copy (bf16, or a strided chunk)
                v.param.copy_(p.view(nr, nc, n))
            # 7. densification: a separate pass on the written parameter, as the Triton path does
            if cfg.alpha != 0.0:
                _densify_(v, nb, n, bucket, *densify_scalars(cfg))


def _densify_(v: _ChunkViews, nb: int, n: int, bucket: int, lr_alpha: float, keep: float) -> None:
    """p -= (lr * alpha) * dequant(e), rounded to p's dtype; e = quant4((1 - alpha) * dequant(e)).

    The order of operations is fixed (docs/design.md, "Densification") so the Triton kernel
    (kernels/densify.py) writes the same codes and statistics bit for bit.
    """
    e = dequantize_4bit(_flat_blocks(v.ef_codes, nb), _flat_blocks(v.ef_stats, nb), n, bucket)
    p = _flat_blocks(v.param, nb).float()
    p.sub_(e * lr_alpha)
    if p.data_ptr() != v.param.data_ptr():
        v.param.copy_(p.view(v.param.shape))
    codes, stats = quantize_4bit(e.mul_(keep), bucket)
    v.ef_codes.copy_(codes.view(v.ef_codes.shape))
    v.ef_stats.copy_(stats.view(v.ef_stats.shape))


def any_nonzero(t: torch.Tensor, chunk_elements: int) -> bool:
    """t.any() without a bool temporary the size of t."""
    return any(bool(c.any()) for c in t.reshape(-1).split(chunk_elements))


def nonfinite_flags(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Per tensor, whether it holds a NaN or an infinity: a bool tensor on their device, with no
    host sync and no temporary the size of a tensor.

    The max-magnitude norm propagates NaN and infinity and, unlike a sum, cannot overflow on finite
    values, so it is exact; one multi-tensor launch covers all of them on a GPU.
    """
    if not tensors:
        return torch.zeros(0, dtype=torch.bool)
    norms = torch._foreach_norm([t if t.numel() else t.new_zeros(1) for t in tensors], ord=float("inf"))
    return ~torch.isfinite(torch.stack([n.float() for n in norms]))


def window_weights(cfg: StepConfig, device) -> tuple[int, int, torch.Tensor, torch.Tensor]:
    """(slot written this step, filled slots, b1^q and b2^q per filled slot as fp32).

    Slot s was written at step t - q_s, with age q_s = (t - 1 - s) mod m.
    """
    m, t = cfg.window_size, cfg.step
    ages = [(t - 1 - s) % m for s in range(min(t, m))]
    w1 = torch.tensor([cfg.beta1**q for q in ages], dtype=torch.float32, device=device)
    w2 = torch.tensor([cfg.beta2**q for q in ages], dtype=torch.float32, device=device)
    return (t - 1) % m, len(ages), w1, w2


def bias_corrections(step: int, beta1: float, beta2: float) -> tuple[float, float]:
    """c1 = (1 - b1) / (1 - b1^t), c2 = (1 - b2) / (1 - b2^t): the scales applied to M and S."""
    return (1.0 - beta1) / (1.0 - beta1**step), (1.0 - beta2) / (1.0 - beta2**step)


def dense_moments(
    geometry: Geometry, state: dict[str, torch.Tensor], cfg: StepConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Adam's moments rebuilt densely from a whole parameter's window (internal flat state).

    Returns (M, S) as flat fp32 tensors of the parameter's size: M = sum_i b1^age_i v_i and
    S = sum_i b2^age_i v_i^2 over the window entries, scattered to their elements (the sums a step
    at ``cfg.step`` rebuilds, before its bias corrections c1 and c2).
    """
    _, filled, w1, w2 = window_weights(cfg, state["window_idx"].device)
    w1, w2 = w1.view(-1, 1, 1), w2.view(-1, 1, 1)
    M = torch.zeros(geometry.numel, dtype=torch.float32)
    S = torch.zeros(geometry.numel, dtype=torch.float32)
    for rect in geometry.rects(0, geometry.num_blocks):
        n, k = rect.block_len, rect.k
        v = _ChunkViews(rect, 0, rect.num_rows, 0, rect.num_cols, M, S, state)
        nb = v.num_blocks
        idx = v.win_idx[:filled].reshape(filled, nb, k).long().permute(1, 0, 2).reshape(nb, filled * k)
        val = v.win_val[:filled].reshape(filled, nb, k).float()
        m_blocks = _flat_blocks(v.param, nb).clone().zero_()
        s_blocks = m_blocks.clone()
        m_blocks.scatter_add_(1, idx, (val * w1).permute(1, 0, 2).reshape(nb, filled * k))
        s_blocks.scatter_add_(1, idx, (val * val * w2).permute(1, 0, 2).reshape(nb, filled * k))
        v.param.copy_(m_blocks.view(rect.num_rows, rect.num_cols, n))
        v.grad.copy_(s_blocks.view(rect.num_rows, rect.num_cols, n))
    return M, S
