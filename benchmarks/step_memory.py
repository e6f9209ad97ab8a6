"""Transient memory and time of one MicroAdam step on one large parameter (CPU, reference path).

Each size runs in a fresh subprocess: peak RSS during two steps minus the resident size just
before them (which is also the peak so far), so the parameter, its gradient and the (already
created) state are not counted.

    python benchmarks/step_memory.py                 # 1e6, 1e7, 1e8 elements
    python benchmarks/step_memory.py --sizes 1e6     # quick
"""

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

CHILD = """
import os, resource, time, torch
from microadam_dist import MicroAdam
n = {n}
p = torch.zeros(n, requires_grad=True)
opt = MicroAdam([p], lr=0.0)
p.grad = torch.zeros_like(p)
opt.step()                                  # the probe step: creates the state only
p.grad.normal_()                            # in place: no second gradient-sized allocation
opt.param_groups[0]["lr"] = 1e-3
base = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 <= base + (8 << 20)
t0 = time.perf_counter(); opt.step(); opt.step(); dt = (time.perf_counter() - t0) / 2
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(peak - base, dt, opt.state_bytes(), MicroAdam.chunk_elements)
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=float, nargs="+", default=[1e6, 1e7, 1e8])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    rows = []
    for n in map(int, args.sizes):
        out = subprocess.run([sys.executable, "-c", CHILD.format(n=n)], capture_output=True, text=True, check=True)
        transient, seconds, state, chunk = out.stdout.split()
        rows.append(
            dict(
                numel=n,
                transient_bytes=int(transient),
                step_seconds=float(seconds),
                state_bytes=int(state),
                chunk_elements=int(chunk),
            )
        )
        r = rows[-1]
        print(
            f"numel {n:>12,}  transient {r['transient_bytes'] / 2**20:8.1f} MiB "
            f"({r['transient_bytes'] / r['chunk_elements']:.1f} B per chunk element)  "
            f"state {r['state_bytes'] / n:.4f} B/param  step {r['step_seconds']:.3f} s"
        )
    out = args.out / "step_memory.md"
    lines = [
        "# Transient memory of one MicroAdam step (reference path, CPU)",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; "
        f"one run per size; chunk of {rows[0]['chunk_elements']:,} elements.",
        "",
        "| elements | transient (MiB) | state (bytes/param) | step (s) |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['numel']:,} | {r['transient_bytes'] / 2**20:.1f} | {r['state_bytes'] / r['numel']:.4f} | "
        f"{r['step_seconds']:.3f} |"
        for r in rows
    ]
    out.write_text("\n".join(lines) + "\n")
    print(json.dumps(rows))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
