"""Optimizer step time on CPU: MicroAdam's reference path against torch.optim.AdamW, one run.

For each size, one fp32 parameter of that many elements with a fixed random gradient; every
optimizer is warmed up (state created, ring full for MicroAdam), then timed over --repeats steps.
Reported: the median, the spread (min-max) and the ratio to fused AdamW measured in the same
process. Results go to benchmarks/results/cpu_step.md and cpu_step.png.

    python benchmarks/bench_cpu_step.py                 # 1e6, 1e7, 1e8 elements
    python benchmarks/bench_cpu_step.py --sizes 1e6 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from microadam_dist import MicroAdam

RESULTS = Path(__file__).parent / "results"


def make(name: str, p: torch.nn.Parameter):
    if name == "microadam":
        return MicroAdam([p], lr=1e-4)
    return torch.optim.AdamW([p], lr=1e-4, **{"adamw_fused": {"fused": True},
                                             "adamw_foreach": {"foreach": True},
                                             "adamw_for_loop": {"foreach": False}}[name])


def time_steps(name: str, n: int, repeats: int, warmup: int) -> list[float]:
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(n, generator=gen))
    p.grad = torch.randn(n, generator=gen)
    opt = make(name, p)
    for _ in range(warmup):
        opt.step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    return times


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=float, nargs="+", default=[1e6, 1e7, 1e8])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--optimizers", nargs="+", default=["adamw_fused", "adamw_foreach", "microadam"])
    args = ap.parse_args(argv)
    rows = []
    for n in map(int, args.sizes):
        med = {}
        for name in args.optimizers:
            warmup = 11 if name == "microadam" else 2  # MicroAdam: a full window of 10
            t = time_steps(name, n, args.repeats, warmup)
            med[name] = statistics.median(t)
            rows.append(dict(numel=n, optimizer=name, median=med[name], low=min(t), high=max(t)))
            print(f"{n:>12,} {name:>15} median {med[name] * 1e3:9.2f} ms  (min {min(t) * 1e3:.2f}, "
                  f"max {max(t) * 1e3:.2f})", flush=True)
        for r in rows:
            if r["numel"] == n and "adamw_fused" in med:
                r["ratio_to_fused"] = r["median"] / med["adamw_fused"]
    write(rows, args)


def write(rows, args):
    RESULTS.mkdir(exist_ok=True)
    head = (f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads; fp32, one parameter; median of {args.repeats} steps "
            "after warm-up (MicroAdam: 11 steps, so the window of 10 is full); spread = min-max.")
    lines = ["# Optimizer step time on CPU", "", head, "",
             "| elements | optimizer | median (ms) | min-max (ms) | x fused AdamW |", "|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['ratio_to_fused']:.1f}" if "ratio_to_fused" in r else "-"
        lines.append(f"| {r['numel']:,} | {r['optimizer']} | {r['median'] * 1e3:.2f} | "
                     f"{r['low'] * 1e3:.2f}-{r['high'] * 1e3:.2f} | {ratio} |")
    (RESULTS / "cpu_step.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name in dict.fromkeys(r["optimizer"] for r in rows):
        pts = [r for r in rows if r["optimizer"] == name]
        ax.errorbar([r["numel"] for r in pts], [r["median"] * 1e3 for r in pts],
                    yerr=[[(r["median"] - r["low"]) * 1e3 for r in pts], [(r["high"] - r["median"]) * 1e3 for r in pts]],
                    marker="o", capsize=3, label=name)
    ax.set(xscale="log", yscale="log", xlabel="parameter elements", ylabel="step time (ms)",
           title="Optimizer step on CPU (reference path)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "cpu_step.png", dpi=110)
    print(f"wrote {RESULTS / 'cpu_step.md'} and cpu_step.png")


if __name__ == "__main__":
    main()
