"""On a CUDA machine: the Triton path's step time against torch's fused AdamW, 1e8 to 1e9 elements.

Each size: one parameter (bf16 or fp32) with a fixed gradient; both optimizers warmed up (the
MicroAdam window full), then timed with CUDA events, median of --repeats steps. Prints the
ratio and the achieved bandwidth from the traffic model (benchmarks/traffic_model.py), and
writes results/triton_gpu.md.

    python benchmarks/bench_triton_gpu.py --sizes 1e8 5e8 1e9 --dtype bf16
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


def median_step_ms(opt, repeats: int) -> tuple[float, float, float]:
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        opt.step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), min(times), max(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=float, nargs="+", default=[1e8, 5e8, 1e9])
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_triton_gpu.py needs a CUDA device (none found); the CPU numbers come "
                         "from bench_cpu_step.py")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    nbytes = 2 if dtype == torch.bfloat16 else 4
    rows = [f"# Triton path vs fused AdamW on {torch.cuda.get_device_name()}", "",
            f"{args.dtype} parameters and gradients, median of {args.repeats} steps after warm-up (min-max).",
            "", "| elements | fused AdamW (ms) | MicroAdam Triton (ms) | ratio | MicroAdam GB/s (model) |",
            "|---|---|---|---|---|"]
    for n in map(int, args.sizes):
        p = torch.nn.Parameter(torch.randn(n, device="cuda", dtype=dtype))
        p.grad = torch.randn_like(p)
        adam = torch.optim.AdamW([p], lr=1e-5, fused=True)
        for _ in range(3):
            adam.step()
        t_adam = median_step_ms(adam, args.repeats)
        del adam
        torch.cuda.empty_cache()
        micro = MicroAdam([p], lr=1e-5, backend="triton")
        for _ in range(11):
            micro.step()
        t_micro = median_step_ms(micro, args.repeats)
        traffic = sum(triton_path(nbytes, nbytes, False).values()) * n
        bandwidth = traffic / (t_micro[0] / 1e3) / 1e9
        rows.append(f"| {n:,} | {t_adam[0]:.2f} ({t_adam[1]:.2f}-{t_adam[2]:.2f}) | {t_micro[0]:.2f} "
                    f"({t_micro[1]:.2f}-{t_micro[2]:.2f}) | {t_micro[0] / t_adam[0]:.2f} | {bandwidth:.0f} |")
        print(rows[-1], flush=True)
        del micro, p
        torch.cuda.empty_cache()
    out = Path(__file__).parent / "results" / "triton_gpu.md"
    out.write_text("\n".join(rows) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
