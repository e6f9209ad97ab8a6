"""On a CUDA machine: MicroAdam's step time (Triton and PyTorch paths) against torch's AdamW.

Each size and dtype: one parameter with a fixed gradient; every optimizer warmed up (the
MicroAdam window full), then timed with CUDA events, median of --repeats steps (min-max).
Columns: fused and foreach AdamW, MicroAdam's Triton path, MicroAdam's PyTorch reference path
on the GPU (up to --reference-max elements), the Triton/fused ratio, the bandwidth the Triton
path reaches on the traffic model (benchmarks/traffic_model.py) and the optimizer state in
bytes per parameter. Writes a markdown table (default results/triton_gpu.md).

    python benchmarks/bench_triton_gpu.py --sizes 1e6 1e8 1e9 --dtypes bf16 fp32

--roofline adds the memory floor of each size (``copy_`` of one tensor into another, and ``sum()``,
the cost of a separate finiteness pass); --model llama7b-fsdp8 times a Llama-7B's 291 parameter
tensors each cut to 1/8 along dim 0 (one FSDP2 rank of 8) against one tensor of the same total
size (issue 17's target: within 10 % per element). Every time is the optimizer's whole step,
finiteness check and every launch included.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from traffic_model import triton_path  # noqa: E402

from microadam_dist import MicroAdam  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def median_step_ms(opt, warmup: int, repeats: int) -> tuple[float, float, float]:
    for _ in range(warmup):
        opt.step()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        opt.step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), min(times), max(times)


def llama7b_fsdp8_shapes() -> list[tuple[int, ...]]:
    """A Llama-7B's 291 parameters (embedding, 32 x (4 attention, 3 MLP, 2 norms), norm, head),
    each cut to 1/8 along dim 0 as FSDP2 shards it over 8 ranks."""
    d, ff, vocab = 4096, 11008, 32000
    layer = [(d, d)] * 4 + [(ff, d), (ff, d), (d, ff), (d,), (d,)]
    shapes = [(vocab, d)] + layer * 32 + [(d,), (vocab, d)]
    assert len(shapes) == 291
    return [(-(-s[0] // 8),) + s[1:] for s in shapes]


def time_ms(fn, repeats: int) -> tuple[float, float, float]:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), min(times), max(times)


def roofline_rows(sizes, dtypes, repeats) -> list[str]:
    rows = [
        "",
        "## Memory floor (same run)",
        "",
        "| dtype | elements | copy_ (ms) | sum() (ms) | copy_ GB/s |",
        "|---|---|---|---|---|",
    ]
    for name in dtypes:
        for n in map(int, sizes):
            x = torch.randn(n, device="cuda", dtype=DTYPES[name])
            y = torch.empty_like(x)
            copy = time_ms(lambda x=x, y=y: y.copy_(x), repeats)
            total = time_ms(lambda x=x: x.sum(), repeats)
            gbs = 2 * x.numel() * x.element_size() / (copy[0] / 1e3) / 1e9
            rows.append(f"| {name} | {n:,} | {fmt(copy)} | {fmt(total)} | {gbs:.0f} |")
            print(rows[-1], flush=True)
            del x, y
            torch.cuda.empty_cache()
    return rows


def model_rows(dtypes, repeats) -> list[str]:
    shapes = llama7b_fsdp8_shapes()
    total = sum(torch.Size(s).numel() for s in shapes)
    rows = [
        "",
        f"## Llama-7B at FSDP2 / 8 ranks: {len(shapes)} tensors, {total:,} elements on one rank",
        "",
        "| dtype | fused AdamW, list (ms) | MicroAdam Triton, list (ms) | MicroAdam Triton, one tensor (ms) | "
        "list / one tensor | Triton / fused (list) |",
        "|---|---|---|---|---|---|",
    ]
    for name in dtypes:
        dtype = DTYPES[name]
        params = [torch.nn.Parameter(torch.randn(s, device="cuda", dtype=dtype)) for s in shapes]
        for q in params:
            q.grad = torch.randn_like(q)
        fused = median_step_ms(torch.optim.AdamW(params, lr=1e-5, fused=True), 3, repeats)
        listed = median_step_ms(MicroAdam(params, lr=1e-5, backend="triton"), 12, repeats)
        del params
        torch.cuda.empty_cache()
        one = torch.nn.Parameter(torch.randn(total, device="cuda", dtype=dtype))
        one.grad = torch.randn_like(one)
        single = median_step_ms(MicroAdam([one], lr=1e-5, backend="triton"), 12, repeats)
        del one
        torch.cuda.empty_cache()
        rows.append(
            f"| {name} | {fmt(fused)} | {fmt(listed)} | {fmt(single)} | {listed[0] / single[0]:.2f} | "
            f"{listed[0] / fused[0]:.2f} |"
        )
        print(rows[-1], flush=True)
    return rows


def state_bytes(opt) -> int:
    return sum(
        t.numel() * t.element_size()
        for s in opt.state.values()
        for t in s.values()
        if torch.is_tensor(t) and t.device.type == "cuda"
    )


def fmt(t) -> str:
    return "-" if t is None else f"{t[0]:.2f} ({t[1]:.2f}-{t[2]:.2f})"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=float, nargs="+", default=[1e6, 1e7, 1e8, 1e9])
    ap.add_argument("--dtypes", choices=list(DTYPES), nargs="+", default=["bf16", "fp32"])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument(
        "--reference-max", type=float, default=1e8, help="largest size at which the PyTorch reference path is timed too"
    )
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "triton_gpu.md")
    ap.add_argument("--roofline", action="store_true", help="also time copy_ and sum() at each size")
    ap.add_argument("--model", choices=["llama7b-fsdp8"], help="also time a model-shaped parameter list")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit(
            "bench_triton_gpu.py needs a CUDA device (none found); the CPU numbers come from bench_baselines.py"
        )
    rows = [
        f"# MicroAdam step on {torch.cuda.get_device_name()} vs torch AdamW",
        "",
        f"torch {torch.__version__}; one parameter of each size, fixed gradient, default MicroAdam "
        f"hyperparameters (window 10, density 1%, blocks 4096, buckets 2048); median of {args.repeats} "
        "steps after warm-up (min-max), CUDA events. GB/s: the Triton path's bytes on the traffic "
        "model divided by its median time.",
        "",
        "| dtype | elements | fused AdamW (ms) | foreach AdamW (ms) | MicroAdam Triton (ms) | "
        "MicroAdam torch (ms) | Triton / fused | Triton GB/s | state B/param AdamW / MicroAdam |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in args.dtypes:
        dtype = DTYPES[name]
        nbytes = torch.finfo(dtype).bits // 8
        for n in map(int, args.sizes):
            p = torch.nn.Parameter(torch.randn(n, device="cuda", dtype=dtype))
            p.grad = torch.randn_like(p)
            times = {}
            for label, make in [
                ("fused", lambda p=p: torch.optim.AdamW([p], lr=1e-5, fused=True)),
                ("foreach", lambda p=p: torch.optim.AdamW([p], lr=1e-5, foreach=True)),
                ("triton", lambda p=p: MicroAdam([p], lr=1e-5, backend="triton")),
                ("torch", lambda p=p: MicroAdam([p], lr=1e-5, backend="torch")),
            ]:
                if label == "torch" and n > args.reference_max:
                    times[label] = None
                    continue
                opt = make()
                times[label] = median_step_ms(opt, 12 if "Micro" in type(opt).__name__ else 3, args.repeats)
                times[label + "_bytes"] = state_bytes(opt) / n
                del opt
                torch.cuda.empty_cache()
            traffic = sum(triton_path(nbytes, nbytes, False).values()) * n
            bandwidth = traffic / (times["triton"][0] / 1e3) / 1e9
            rows.append(
                f"| {name} | {n:,} | {fmt(times['fused'])} | {fmt(times['foreach'])} | "
                f"{fmt(times['triton'])} | {fmt(times['torch'])} | "
                f"{times['triton'][0] / times['fused'][0]:.2f} | {bandwidth:.0f} | "
                f"{times['fused_bytes']:.2f} / {times['triton_bytes']:.3f} |"
            )
            print(rows[-1], flush=True)
            del p
            torch.cuda.empty_cache()
    if args.roofline:
        rows += roofline_rows(args.sizes, args.dtypes, args.repeats)
    if args.model:
        rows += model_rows(args.dtypes, args.repeats)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(rows) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
