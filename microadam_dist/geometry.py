"""Block and bucket geometry of one parameter, defined on its *global* element index.

Everything here is arithmetic on the parameter's global shape and the hyperparameters; nothing
depends on the device, the world size or how the parameter is sharded. See docs/design.md.

A parameter is viewed as ``rows`` rows of ``row_len`` elements (row = all elements of one index
along dim 0; a 0-D or 1-D parameter is a single row). Each row is cut into blocks of
``block_size`` elements; the last block of a row may be shorter (the *short* block). Blocks never
cross a row boundary, so FSDP2's dim-0 shards (whole rows) never cut a block. Each block is cut
into quantization buckets of ``quant_bucket_size`` elements (``block_size`` is a multiple of it,
so only a short block can end in a shorter bucket).

Per block the state holds, in global block order:
  * ``k`` window entries per slot (block-local int16 index + bf16 value), ``k = ceil(density * n)``;
  * ``ceil(n / 2)`` bytes of packed 4-bit error-feedback codes;
  * ``ceil(n / quant_bucket_size)`` buckets of (lo, hi) fp32 statistics.
Because every row has the same block pattern, every offset is linear in (row, block-in-row).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass


def topk_count(density: float, n: int) -> int:
    """k = ceil(density * n), at least 1 and at most n.

    The tiny relative slack keeps decimal densities exact: 0.07 * 100 is 7.000000000000001 in
    binary floating point, whose plain ceiling would be 8.
    """
    return min(n, max(1, math.ceil(density * n * (1.0 - 1e-12))))


@dataclass(frozen=True)
class BlockRect:
    """A rectangle of equal-length blocks: ``num_rows`` x ``num_cols`` blocks of ``block_len``.

    All offsets are relative to the start of the block range the rectangle belongs to, and strides
    say how far the next row (``*_row_stride``) or the next block in a row (``*_col_stride``) is
    in each flat buffer: elements, window entries, error-feedback bytes, buckets.
    """

    num_rows: int
    num_cols: int
    block_len: int
    k: int
    buckets: int  # buckets per block
    ef_bytes: int  # packed error-feedback bytes per block
    elem_offset: int
    k_offset: int
    ef_offset: int
    bucket_offset: int
    elem_row_stride: int
    k_row_stride: int
    ef_row_stride: int
    bucket_row_stride: int

    @property
    def num_blocks(self) -> int:
        return self.num_rows * self.num_cols

    @property
    def numel(self) -> int:
        return self.num_blocks * self.block_len


@dataclass(frozen=True)
class Geometry:
    shape: tuple[int, ...]
    block_size: int
    quant_bucket_size: int
    density: float

    # ---- derived sizes -------------------------------------------------------------------------
    @functools.cached_property
    def numel(self) -> int:
        return math.prod(self.shape)

    @functools.cached_property
    def rows(self) -> int:
        return self.shape[0] if len(self.shape) >= 2 else 1

    @functools.cached_property
    def row_len(self) -> int:
        return self.numel // self.rows if self.rows else 0

    @functools.cached_property
    def full_blocks_per_row(self) -> int:
        return self.row_len // self.block_size

    @functools.cached_property
    def short_len(self) -> int:
        return self.row_len % self.block_size

    @functools.cached_property
    def blocks_per_row(self) -> int:
        return self.full_blocks_per_row + (1 if self.short_len else 0)

    @functools.cached_property
    def num_blocks(self) -> int:
        return self.rows * self.blocks_per_row

    # every size triple here is (window entries, error-feedback bytes, buckets): the order of the state's fields
    def _block_sizes(self, n: int) -> tuple[int, int, int]:
        """(k, ef bytes, buckets) of a block of n elements."""
        return topk_count(self.density, n), (n + 1) // 2, -(-n // self.quant_bucket_size)

    @functools.cached_property
    def full(self) -> tuple[int, int, int]:
        return self._block_sizes(self.block_size)

    @functools.cached_property
    def short(self) -> tuple[int, int, int]:
        return self._block_sizes(self.short_len) if self.short_len else (0, 0, 0)

    @functools.cached_property
    def per_row(self) -> tuple[int, int, int]:
        """(window entries, error-feedback bytes, buckets) of one row."""
        f, t, n = self.full, self.short, self.full_blocks_per_row
        return tuple(n * fi + ti for fi, ti in zip(f, t))

    # ---- offsets of a block boundary -----------------------------------------------------------
    def block_start(self, b: int) -> tuple[int, int, int, int]:
        """(element, window entry, ef byte, bucket) offsets where block ``b`` starts.

        ``b == num_blocks`` gives the totals.
        """
        row, col = divmod(b, self.blocks_per_row)
        (kf, ef, qf), (kr, er, qr) = self.full, self.per_row
        return (
            row * self.row_len + col * self.block_size,
            row * kr + col * kf,
            row * er + col * ef,
            row * qr + col * qf,
        )

    def block_of_element(self, e: int) -> int:
        """The block that holds global element ``e`` (``numel`` maps to ``num_blocks``)."""
        row, in_row = divmod(e, self.row_len)
        return row * self.blocks_per_row + min(in_row // self.block_size, self.blocks_per_row)

    def first_block_at_or_after(self, e: int) -> int:
        """The first block whose start is at or after global element ``e``."""
        b = self.block_of_element(e)
        return b if self.block_start(b)[0] >= e else b + 1

    def owned_blocks(self, start: int, end: int) -> tuple[int, int]:
        """Blocks [b0, b1) owned by whoever holds elements [start, end): those whose first element is
        in the range (the rule that makes any cut of the flat index step like one process)."""
        return self.first_block_at_or_after(start), self.first_block_at_or_after(end)

    def state_sizes(self, b0: int = 0, b1: int | None = None) -> tuple[int, int, int]:
        """(window entries, ef bytes, buckets) held by blocks [b0, b1)."""
        b1 = self.num_blocks if b1 is None else b1
        s, e = self.block_start(b0), self.block_start(b1)
        return e[1] - s[1], e[2] - s[2], e[3] - s[3]

    def state_bytes(self, window_size: int, b0: int = 0, b1: int | None = None) -> int:
        k, ef, buckets = self.state_sizes(b0, b1)
        # int16 index + bf16 value per window entry, uint8 codes, fp32 (lo, hi), int64 step
        return window_size * k * 4 + ef + buckets * 8 + 8

    # ---- decomposition of a block range into uniform rectangles --------------------------------
    def rects(self, b0: int = 0, b1: int | None = None) -> list["BlockRect"]:
        """Split blocks [b0, b1) into rectangles of equal-length blocks, in block order."""
        b1 = self.num_blocks if b1 is None else b1
        if not 0 <= b0 <= b1 <= self.num_blocks:
            raise ValueError(f"block range [{b0}, {b1}) outside [0, {self.num_blocks})")
        bpr = self.blocks_per_row
        rects = []  # (row0, rows, col0, col1)
        b = b0
        while b < b1:
            row, col = divmod(b, bpr)
            if col == 0 and b1 - b >= bpr:  # run of whole rows
                n = (b1 - b) // bpr
                rects.append((row, n, 0, bpr))
                b += n * bpr
            else:  # part of one row
                end = min(bpr, col + (b1 - b))
                rects.append((row, 1, col, end))
                b += end - col
        origin = self.block_start(b0)
        out = []
        nf = self.full_blocks_per_row
        for row, nrows, c0, c1 in rects:
            if c0 < nf:  # full-length blocks
                out.append(self._rect(row, nrows, c0, min(c1, nf), self.block_size, self.full, origin))
            if c1 > nf:  # the short block
                out.append(self._rect(row, nrows, nf, nf + 1, self.short_len, self.short, origin))
        return out

    def _rect(self, row, nrows, c0, c1, n, sizes, origin) -> BlockRect:
        k, ef, buckets = sizes
        start = self.block_start(row * self.blocks_per_row + c0)
        kr, er, qr = self.per_row
        return BlockRect(
            num_rows=nrows,
            num_cols=c1 - c0,
            block_len=n,
            k=k,
            buckets=buckets,
            ef_bytes=ef,
            elem_offset=start[0] - origin[0],
            k_offset=start[1] - origin[1],
            ef_offset=start[2] - origin[2],
            bucket_offset=start[3] - origin[3],
            elem_row_stride=self.row_len,
            k_row_stride=kr,
            ef_row_stride=er,
            bucket_row_stride=qr,
        )


@functools.lru_cache(maxsize=4096)
def geometry_for(shape: tuple[int, ...], block_size: int, quant_bucket_size: int, density: float) -> Geometry:
    return Geometry(tuple(shape), block_size, quant_bucket_size, density)


def geometry_of(shape, group: dict) -> Geometry:
    """The geometry of a parameter of ``shape`` under a param group's hyperparameters."""
    return geometry_for(tuple(shape), group["block_size"], group["quant_bucket_size"], float(group["density"]))
