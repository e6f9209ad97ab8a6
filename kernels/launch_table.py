"""The launch table: one launch of a kernel serves every block rectangle (of any parameters) that
compiles the same, as torch's fused optimizers take tensor lists.

A table holds one int64 row per ``geometry.BlockRect`` and a second array names the rectangle of
each program (one program per block). A row is the rectangle's ``RECT_FIELDS``, then up to
``ADDRESSES`` tensor addresses (each kernel's own order), then up to ``SCALARS`` per-step scalars
(each kernel's own; floats as fp32 bits). The kernels read them with ``block_of``, ``address``
and ``f32_field``; the host builds them with ``Launches``.
"""

from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

# no fused multiply-adds in any kernel: the GPU compiler would otherwise round lo + code * u once,
# where PyTorch's separate kernels round twice
LAUNCH_OPTIONS = {"enable_fp_fusion": False}

RECT_FIELDS = (
    "n",
    "k",
    "num_cols",
    "buckets",
    "ef_bytes",
    "elem_off",
    "elem_row",
    "k_off",
    "k_row",
    "ef_off",
    "ef_row",
    "q_off",
    "q_row",
    "first_program",
)
ADDRESSES, SCALARS = 12, 8
ADDRESS_AT = tl.constexpr(len(RECT_FIELDS))
SCALAR_AT = tl.constexpr(len(RECT_FIELDS) + ADDRESSES)
ROW = tl.constexpr(len(RECT_FIELDS) + ADDRESSES + SCALARS)


@triton.jit
def block_of(table_ptr, rect_of_ptr, ALIGNED: tl.constexpr):
    """This program's block: its rectangle's table row, the block's length n, k, buckets and code
    bytes, and its first element, window entry, code byte and bucket (RECT_FIELDS order).
    ALIGNED: every rectangle of the launch has 16-divisible element and code-byte offsets."""
    pid = tl.program_id(0)
    t = table_ptr + tl.load(rect_of_ptr + pid).to(tl.int64) * ROW
    n = tl.load(t).to(tl.int32)
    k = tl.load(t + 1).to(tl.int32)
    num_cols = tl.load(t + 2).to(tl.int32)
    buckets = tl.load(t + 3).to(tl.int32)
    ef_bytes = tl.load(t + 4).to(tl.int32)
    b = pid - tl.load(t + 13).to(tl.int32)  # 32-bit division: no 64-bit division routine
    row = (b // num_cols).to(tl.int64)
    col = (b % num_cols).to(tl.int64)
    e0 = tl.load(t + 5) + row * tl.load(t + 6) + col * n
    k0 = tl.load(t + 7) + row * tl.load(t + 8) + col * k
    c0 = tl.load(t + 9) + row * tl.load(t + 10) + col * ef_bytes
    q0 = tl.load(t + 11) + row * tl.load(t + 12) + col * buckets
    if ALIGNED:  # what Triton's JIT infers from 16-divisible arguments: masks and vector loads
        n = tl.multiple_of(n, 16)
        ef_bytes = tl.multiple_of(ef_bytes, 16)
        e0 = tl.multiple_of(e0, 16)
        c0 = tl.multiple_of(c0, 16)
    return t, n, k, buckets, ef_bytes, e0, k0, c0, q0


@triton.jit
def address(t, i, dtype: tl.constexpr, ALIGNED: tl.constexpr):
    """The i-th tensor address of table row t as a pointer to dtype (ALIGNED: 16-byte aligned)."""
    ptr = tl.load(t + ADDRESS_AT + i).to(tl.pointer_type(dtype))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def scalar(t, i):
    """The i-th integer scalar of table row t."""
    return tl.load(t + SCALAR_AT + i)


@triton.jit
def f32_field(t, i):
    """The i-th scalar of table row t, a float (stored as its fp32 bits)."""
    return tl.load(t + SCALAR_AT + i).to(tl.int32).to(tl.float32, bitcast=True)


def _as_field(x) -> int:
    return struct.unpack("<i", struct.pack("<f", x))[0] if isinstance(x, float) else int(x)


class Launches:
    """The rectangles of one pass, grouped by what their kernel compiles to: one launch per group,
    whatever the number of parameters. Nothing runs before ``launch``, so a rectangle refused while
    they are added leaves nothing half done."""

    def __init__(self, device: torch.device):
        self.device = device
        self.groups: dict = {}  # (kernel, constexprs, options) -> (rows, blocks per row)

    def add(self, kernel, rect, addresses: list[int], hinted, constexprs: dict, scalars=(), **options) -> None:
        """One rectangle of ``kernel``: its tensor addresses, those of them the alignment hint
        covers (``hinted``: indices), its constexprs and its scalars (floats become fp32 bits)."""
        fields = [
            rect.block_len,
            rect.k,
            rect.num_cols,
            rect.buckets,
            rect.ef_bytes,
            rect.elem_offset,
            rect.elem_row_stride,
            rect.k_offset,
            rect.k_row_stride,
            rect.ef_offset,
            rect.ef_row_stride,
            rect.bucket_offset,
            rect.bucket_row_stride,
            0,  # first_program, set at launch
        ]
        # ALIGNED (vector loads) when every block's element and code-byte offsets and the hinted
        # addresses are 16-divisible, as Triton's JIT would specialize them as arguments
        offsets = fields[4:7] + fields[9:11] + fields[:1]
        aligned = all(v % 16 == 0 for v in offsets) and all(addresses[i] % 16 == 0 for i in hinted)
        row = fields + addresses + [0] * (ADDRESSES - len(addresses)) + [_as_field(x) for x in scalars]
        key = (kernel, tuple(sorted({**constexprs, "ALIGNED": aligned}.items())), tuple(sorted(options.items())))
        rows, blocks = self.groups.setdefault(key, ([], []))
        rows.append(row + [0] * (ROW.value - len(row)))
        blocks.append(rect.num_blocks)

    def launch(self) -> None:
        for (kernel, constexprs, options), (rows, blocks) in self.groups.items():
            first = 0
            for row, nb in zip(rows, blocks):
                row[len(RECT_FIELDS) - 1] = first
                first += nb
            table = to_device(torch.tensor(rows, dtype=torch.int64), self.device)
            rect_of = to_device(
                torch.repeat_interleave(torch.arange(len(rows), dtype=torch.int32), torch.tensor(blocks)), self.device
            )
            kernel[(first,)](table, rect_of, **dict(constexprs), **dict(options), **LAUNCH_OPTIONS)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host-built tensor on ``device``, copied without waiting for the GPU (from pinned memory)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
