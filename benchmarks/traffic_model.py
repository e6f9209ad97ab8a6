"""Memory traffic model: bytes read and written per parameter per optimizer step.

A model, not a measurement: each path's loads and stores counted from its code at the default
geometry (window 10, density 1%, block 4096, bucket 2048), for fp32 and bf16 parameters and
gradients. The Triton path's window traffic counts the worst case, every window entry distinct.

    python benchmarks/traffic_model.py      # prints the table, writes results/traffic_model.md
"""

from __future__ import annotations

import math
from pathlib import Path

WINDOW, DENSITY, BLOCK, BUCKET = 10, 0.01, 4096, 2048
K = math.ceil(DENSITY * BLOCK)
ENTRIES = WINDOW * K / BLOCK  # window entries per parameter element (0.1)


def triton_path(p_bytes: int, g_bytes: int, weight_decay: bool) -> dict[str, float]:
    stats = 2 * 4 / BUCKET  # (lo, hi) fp32 per bucket
    compress = {
        "gradient": g_bytes,
        "codes read + written": 0.5 + 0.5,
        "bucket stats": 2 * stats,
        "ring slot written (int16 + bf16)": 4 * K / BLOCK,
        # what a step skipped for a non-finite gradient restores: the old codes (read again from the
        # cache, not from memory), statistics and ring-slot entries, written to the undo record
        "undo record (old slot read; codes, stats, slot written)": 4 * K / BLOCK + 0.5 + stats + 4 * K / BLOCK,
    }
    update = {
        "window read (int16 + bf16)": 4 * ENTRIES,
        "parameter at window entries (read + write)": 2 * p_bytes * ENTRIES,
    }
    if weight_decay:
        update["parameter, dense decay (read + write)"] = 2 * p_bytes
    return {**compress, **update}


def reference_path(p_bytes: int, g_bytes: int, weight_decay: bool) -> dict[str, float]:
    """The eager PyTorch path: every op streams its fp32 operands through memory (per element)."""
    return {
        "gradient to fp32": g_bytes + (4 + 4 if g_bytes == 2 else 0),
        "dequantize (unpack codes, scale, add)": 0.5 + 1 + 1 + 4 + 4 + 4 + 4,
        "accumulate a = g + e": 4 + 4 + 4,
        "|a| and float top-k": 4 + 4 + 4,
        "quantize residual (min, max, sub, div, add, floor, clamp, cast, pack)": 8 + 5 * 8 + 4 + 1 + 1 + 0.5,
        "window and update at the entries": 4 * ENTRIES * 3 + 2 * p_bytes * ENTRIES,
        **({"parameter, dense decay (read + write)": 2 * p_bytes} if weight_decay else {}),
    }


def fused_adamw(p_bytes: int, g_bytes: int) -> dict[str, float]:
    return {
        "parameter (read + write)": 2 * p_bytes,
        "gradient": g_bytes,
        "exp_avg, exp_avg_sq fp32 (read + write)": 4 * 4,
    }


def main():
    lines = [
        "# Memory traffic per parameter per optimizer step (model)",
        "",
        f"Window {WINDOW}, density {DENSITY:.0%} (k = {K} of {BLOCK}), bucket {BUCKET}. Counted from "
        "the code, not measured; the Triton path's window part is the worst case (all entries distinct).",
        "",
        "| parameters / gradients | weight decay | fused AdamW | MicroAdam Triton | MicroAdam reference | "
        "Triton / AdamW |",
        "|---|---|---|---|---|---|",
    ]
    for label, pb, gb in (("fp32 / fp32", 4, 4), ("bf16 / bf16 (fp32 AdamW moments)", 2, 2)):
        for wd in (False, True):
            adam = sum(fused_adamw(pb, gb).values())
            tri = sum(triton_path(pb, gb, wd).values())
            ref = sum(reference_path(pb, gb, wd).values())
            lines.append(
                f"| {label} | {'yes' if wd else 'no'} | {adam:.1f} | {tri:.2f} | {ref:.0f} | {tri / adam:.2f} |"
            )
    lines += ["", "Triton path, fp32, no weight decay, item by item:", ""]
    lines += [f"- {k}: {v:.3f} B" for k, v in triton_path(4, 4, False).items()]
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(__file__).parent / "results" / "traffic_model.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(text)


if __name__ == "__main__":
    main()
