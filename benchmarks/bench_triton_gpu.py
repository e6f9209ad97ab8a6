"""On a CUDA machine: MicroAdam's step time (Triton and PyTorch paths) against torch's AdamW.

Each size and dtype: one parameter with a fixed gradient; every optimizer warmed up (the
MicroAdam window full), then timed with CUDA events, median of --repeats steps (min-max).
Columns: fused and foreach AdamW, MicroAdam's Triton path, MicroAdam's PyTorch reference path
on the GPU (up to --reference-max elements), the Triton/fused ratio, the bandwidth the Triton
path reaches on the traffic model (benchmarks/traffic_model.py) and the optimizer state in
bytes per parameter. Writes a markdown table (default results/triton_gpu.md).

    python benchmarks/bench_triton_gpu.py --sizes 1e6 1e8 1e9 --dtypes bf16 fp32
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


def state_bytes(opt) -> int:
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
               if torch.is_tensor(t) and t.device.type == "cuda")


def fmt(t) -> str:
    return "-" if t is None else f"{t[0]:.2f} ({t[1]:.2f}-{t[2]:.2f})"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=float, nargs="+", default=[1e6, 1e7, 1e8, 1e9])
    ap.add_argument("--dtypes", choices=list(DTYPES), nargs="+", default=["bf16", "fp32"])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--reference-max", type=float, default=1e8,
                    help="largest size at which the PyTorch reference path is timed too")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "triton_gpu.md")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_triton_gpu.py needs a CUDA device (none found); the CPU numbers come "
                         "from bench_baselines.py")
    rows = [f"# MicroAdam step on {torch.cuda.get_device_name()} vs torch AdamW", "",
            f"torch {torch.__version__}; one parameter of each size, fixed gradient, default MicroAdam "
            f"hyperparameters (window 10, density 1%, blocks 4096, buckets 2048); median of {args.repeats} "
            "steps after warm-up (min-max), CUDA events. GB/s: the Triton path's bytes on the traffic "
            "model divided by its median time.", "",
            "| dtype | elements | fused AdamW (ms) | foreach AdamW (ms) | MicroAdam Triton (ms) | "
            "MicroAdam torch (ms) | Triton / fused | Triton GB/s | state B/param AdamW / MicroAdam |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name in args.dtypes:
        dtype = DTYPES[name]
        nbytes = torch.finfo(dtype).bits // 8
        for n in map(int, args.sizes):
            p = torch.nn.Parameter(torch.randn(n, device="cuda", dtype=dtype))
            p.grad = torch.randn_like(p)
            times = {}
            for label, make in [("fused", lambda: torch.optim.AdamW([p], lr=1e-5, fused=True)),
                                ("foreach", lambda: torch.optim.AdamW([p], lr=1e-5, foreach=True)),
                                ("triton", lambda: MicroAdam([p], lr=1e-5, backend="triton")),
                                ("torch", lambda: MicroAdam([p], lr=1e-5, backend="torch"))]:
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
            rows.append(f"| {name} | {n:,} | {fmt(times['fused'])} | {fmt(times['foreach'])} | "
                        f"{fmt(times['triton'])} | {fmt(times['torch'])} | "
                        f"{times['triton'][0] / times['fused'][0]:.2f} | {bandwidth:.0f} | "
                        f"{times['fused_bytes']:.2f} / {times['triton_bytes']:.3f} |")
            print(rows[-1], flush=True)
            del p
            torch.cuda.empty_cache()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(rows) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
