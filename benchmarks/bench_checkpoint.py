"""Checkpoint conversion: throughput (GB/s) and peak memory on a synthetic checkpoint.

A synthetic canonical checkpoint (fp32 weights and valid MicroAdam state: in-block window
indices, ordered bucket statistics, default geometry, window full) of --params elements in
parameters of --param-elements each is written, then converted by ``microadam-ckpt`` in
subprocesses: canonical -> DCP (FSDP2), DCP -> canonical, and inspect --verify. Each
conversion's peak resident memory is read from the child's rusage; the baseline is the same
command's import cost (``microadam-ckpt --help``). Writes results/checkpoint_conversion.md.

    python benchmarks/bench_checkpoint.py --params 1e9          # about 5 GB on disk, ~4 minutes
    python benchmarks/bench_checkpoint.py --params 1e7 --quick  # a smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from microadam_dist.checkpoint import Checkpoint, ParamEntry, write_canonical

RESULTS = Path(__file__).parent / "results"
HYPER = {
    "lr": 1e-4,
    "betas": (0.9, 0.999),
    "eps": 1e-8,
    "weight_decay": 0.0,
    "window_size": 10,
    "density": 0.01,
    "block_size": 4096,
    "quant_bucket_size": 2048,
}


class SyntheticCheckpoint(Checkpoint):
    """Random but valid weights and MicroAdam state, made one parameter at a time on demand."""

    kind = "synthetic"

    def __init__(self, total: int, per_param: int, rows: int = 1024, seed: int = 0):
        super().__init__(Path("<synthetic>"))
        self.groups = [dict(HYPER)]
        self.step = 10
        self.seed = seed
        count = max(1, math.ceil(total / per_param))
        for i in range(count):
            numel = min(per_param, total - i * per_param)
            shape = (rows, numel // rows) if numel % rows == 0 else (numel,)
            self.params[f"layers.{i}.weight"] = ParamEntry(f"layers.{i}.weight", shape, 0)

    def _gen(self, name):
        return torch.Generator().manual_seed(self.seed * 1_000_003 + list(self.params).index(name))

    def weight(self, name):
        return torch.randn(self.params[name].shape, generator=self._gen(name))

    def state(self, name):
        layout, m, gen = self.layout(name), HYPER["window_size"], self._gen(name)
        shapes = layout.row_shapes()
        k_total = layout.sizes[0]
        limits = layout.block_len_per_entry().float()
        idx = (torch.rand(m, k_total, generator=gen) * limits).long().clamp_max_(limits.long() - 1).to(torch.int16)
        lo = torch.randn(shapes["ef_stats"][0] * shapes["ef_stats"][1], generator=gen)
        flat = {
            "step": torch.tensor(self.step, dtype=torch.int64),
            "window_idx": idx,
            "window_val": torch.randn(m, k_total, generator=gen).to(torch.bfloat16),
            "ef_codes": torch.randint(0, 256, (math.prod(shapes["ef_codes"]),), generator=gen, dtype=torch.uint8),
            "ef_stats": torch.stack([lo, lo + torch.rand(lo.shape, generator=gen)], dim=-1),
        }
        return layout.to_rows(flat)


def make_synthetic(out: Path, total: int, per_param: int, shard_bytes: int = 1 << 30) -> Path:
    return write_canonical(
        SyntheticCheckpoint(total, per_param), out, shard_bytes=shard_bytes, overwrite=True, progress=False
    )


def run_measured(args: list[str]) -> tuple[float, int, str]:
    """(seconds, peak RSS in bytes, stdout) of ``python -m microadam_dist.cli ARGS`` in a child."""
    probe = (
        "import resource, subprocess, sys, time, json; t = time.perf_counter(); "
        "r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
        "print(json.dumps({'rc': r.returncode, 'seconds': time.perf_counter() - t, 'out': r.stdout, "
        "'err': r.stderr[-2000:], 'rss_kb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))"
    )
    got = subprocess.run(
        [sys.executable, "-c", probe, sys.executable, "-m", "microadam_dist.cli", *args],
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(got.stdout)
    if result["rc"] != 0:
        raise RuntimeError(f"microadam-ckpt {' '.join(args)} failed: {result['err']}")
    return result["seconds"], result["rss_kb"] * 1024, result["out"]


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def state_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("state-*.safetensors"))


def disk_write_gbs(directory: Path, nbytes: int) -> float:
    """This disk's plain sequential write speed (64 MiB buffers, then fsync): the ceiling for any
    conversion that writes ``nbytes``."""
    block = os.urandom(1 << 20) * 64
    path = directory / "disk_probe.bin"
    t = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(max(1, nbytes // len(block))):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - t
    path.unlink()
    return max(1, nbytes // len(block)) * len(block) / seconds / 1e9


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, default=1e9)
    ap.add_argument("--param-elements", type=float, default=16 * 2**20, help="elements per parameter")
    ap.add_argument("--workdir", type=Path, default=Path("runs/bench_checkpoint"))
    ap.add_argument("--quick", action="store_true", help="do not write results/")
    args = ap.parse_args(argv)
    total, per = int(args.params), int(args.param_elements)
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    src, dcp_out, back = args.workdir / "canonical", args.workdir / "dcp", args.workdir / "canonical2"
    t = time.perf_counter()
    make_synthetic(src, total, per)
    made = time.perf_counter() - t
    size, st_size = dir_bytes(src), state_bytes(src)
    print(
        f"synthetic checkpoint: {total:,} elements, {size / 1e9:.2f} GB ({st_size / 1e9:.2f} GB MicroAdam state), "
        f"written in {made:.1f} s",
        flush=True,
    )
    disk = disk_write_gbs(args.workdir, size)
    print(f"disk: plain sequential write {disk:.2f} GB/s", flush=True)
    _, base_rss, _ = run_measured(["--help"])
    rows = []
    for label, cmd, out in [
        ("canonical -> DCP (FSDP2)", ["convert", src, dcp_out, "--to", "dcp", "--quiet"], dcp_out),
        ("DCP -> canonical", ["convert", dcp_out, back, "--to", "single", "--quiet"], back),
        ("inspect --verify (canonical)", ["inspect", back, "--verify"], None),
    ]:
        seconds, rss, _ = run_measured([str(c) for c in cmd])
        rows.append((label, seconds, rss, size / seconds / 1e9, st_size / seconds / 1e9))
        print(
            f"{label}: {seconds:.1f} s, {size / seconds / 1e9:.2f} GB/s all, {st_size / seconds / 1e9:.2f} GB/s "
            f"state, peak RSS {rss / 2**20:.0f} MiB (imports alone {base_rss / 2**20:.0f} MiB)",
            flush=True,
        )
    table = [
        "# Checkpoint conversion (microadam-ckpt)",
        "",
        f"Synthetic checkpoint: {total:,} parameters' elements in {len(SyntheticCheckpoint(total, per).params)} "
        f"parameters of {per:,}; {size / 1e9:.2f} GB on disk (fp32 weights + {st_size / 1e9:.2f} GB MicroAdam "
        "state, default geometry, window full). One run on "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, local disk; torch {torch.__version__}. "
        "Peak RSS from the child's rusage; the CLI's imports alone take "
        f"{base_rss / 2**20:.0f} MiB. The same disk, in the same run, writes {disk:.2f} GB/s when "
        f"Python writes {size / 1e9:.2f} GB of 64 MiB buffers and fsyncs (the ceiling of a conversion, which "
        "also reads, checks and hashes every byte; the ratio column compares each conversion with it).",
        "",
        "| conversion | seconds | GB/s (whole checkpoint) | / disk write speed | GB/s (state) | peak RSS (MiB) "
        "| peak RSS / checkpoint |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, seconds, rss, gbs, sgbs in rows:
        table.append(
            f"| {label} | {seconds:.1f} | {gbs:.2f} | {gbs / disk:.2f} | {sgbs:.2f} | {rss / 2**20:.0f} "
            f"| {rss / size:.3f} |"
        )
    print("\n".join(table))
    if not args.quick:
        (RESULTS / "checkpoint_conversion.md").write_text("\n".join(table) + "\n")
    shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
