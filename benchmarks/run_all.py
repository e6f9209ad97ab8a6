"""Every benchmark, one after the other, each in its own process; results in benchmarks/results/.

    python benchmarks/run_all.py            # the full set, ~100 minutes on 2 cores (make bench)
    python benchmarks/run_all.py --quick    # CI-sized versions, results to a temporary folder

Full: memory, speed and per-rank scaling against the baselines (bench_baselines.py), convergence
on two tasks with tuned learning rates and 3 seeds (bench_convergence.py, MicroAdam with and
without its alpha=0.5 densification) and MicroAdam's window /
density variants on the same tasks (one seed, results/microadam_variants/), fine-tuning a
pretrained GPT (bench_finetune.py, results/finetune.md), the transient memory
of a step (step_memory.py), the Triton path's memory traffic model (traffic_model.py), checkpoint
conversion of a 1e9-element checkpoint (bench_checkpoint.py) and the save/reshard/resume soak
(soak.py). The GPU benchmark (bench_triton_gpu.py, gpu_check.sh) needs a CUDA machine and is not
part of this run.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
VARIANTS = [
    "microadam",
    "microadam:density=0.02",
    "microadam:density=0.05",
    "microadam:window_size=20",
    "microadam:density=0.02,window_size=5",
]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes, results to a temporary folder")
    args = ap.parse_args(argv)
    out = Path(tempfile.mkdtemp(prefix="microadam_bench_")) if args.quick else HERE / "results"
    runs = [
        ["bench_baselines.py", "--out", str(out)] + (["--quick", "--repeats", "2"] if args.quick else []),
        ["bench_convergence.py", "--out", str(out), "--threads", "1"] + (["--quick"] if args.quick else []),
        # MicroAdam's window and density against AdamW on the same tasks (one seed; every variant starts
        # from MicroAdam's grid, extended at a winning edge like the rest)
        [
            "bench_convergence.py",
            "--out",
            str(out / "microadam_variants"),
            "--seeds",
            "0",
            "--threads",
            "1",
            "--optimizers",
            "adamw",
            *VARIANTS,
        ]
        + (["--quick"] if args.quick else []),
        # fine-tuning a pretrained 3.3M GPT (one thread, about 15 min of CPU with the pretraining)
        ["bench_finetune.py", "--out", str(out)] + (["--quick"] if args.quick else []),
        ["step_memory.py", "--out", str(out)] + (["--sizes", "1e6"] if args.quick else []),
        ["traffic_model.py"],  # a model, no measurement: the same numbers every time
        ["bench_checkpoint.py"] + (["--params", "2e7", "--quick"] if args.quick else ["--params", "1e9"]),
        ["soak.py", "--out", str(out)]
        + (["--steps", "80", "--cycles", "2", "--save-every", "20"] if args.quick else []),
    ]
    failed = []
    for cmd in runs:
        started = time.perf_counter()
        print(f"\n=== {' '.join(cmd)}", flush=True)
        if subprocess.run([sys.executable, str(HERE / cmd[0]), *cmd[1:]]).returncode != 0:
            failed.append(cmd[0])
        print(f"=== {cmd[0]}: {time.perf_counter() - started:.0f} s", flush=True)
    print(f"\nresults in {out}" + (f"; FAILED: {failed}" if failed else ""))
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
