"""Stress the main job's exit: many launches, each must exit 0 with no abort at teardown.

Before the teardown fix (microadam_dist.distributed.destroy_process_group), rank processes died
after their work with ``terminate called without an active exception`` (SIGABRT) in about 1 run
in 5 of the first phase below. This runs

  * ``--phase-runs`` launches of the main job's first phase: torchrun, 2 ranks, FSDP2,
    ``--steps 40 --stop-at 20 --save DIR`` (a DCP checkpoint written, then exit), and
  * ``--demo-runs`` full ``python -m microadam_dist.demo`` runs (2 ranks, then a resume at 3),

and counts the runs that failed, and among them the aborts. Results: ``--out`` (markdown) and a
JSON line per run beside it, written as the runs finish.

    python benchmarks/stress_teardown.py --phase-runs 50 --demo-runs 20
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from microadam_dist.distributed import torchrun_command

ROOT = Path(__file__).resolve().parent.parent
ABORT_MARKS = ("terminate called", "SIGABRT", "Fatal Python error: Aborted", "exitcode  : -6")


def run(kind: str, index: int, timeout: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="microadam_stress_") as tmp:
        if kind == "phase":
            cmd = torchrun_command(2, ["--steps", "40", "--stop-at", "20", "--save", f"{tmp}/ckpt", "--quiet"])
        else:
            cmd = [sys.executable, "-m", "microadam_dist.demo", "--out", f"{tmp}/demo"]
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
            rc, output = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as e:
            rc, output = "timeout", f"{e.stdout or ''}{e.stderr or ''}"
        seconds = time.perf_counter() - start
    aborted = any(mark in output for mark in ABORT_MARKS)
    teardown_warning = "still run after destroy_process_group" in output
    return {
        "kind": kind,
        "index": index,
        "rc": rc,
        "aborted": aborted,
        "teardown_warning": teardown_warning,
        "seconds": round(seconds, 1),
        "tail": output[-2000:] if rc != 0 else "",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phase-runs", type=int, default=50)
    ap.add_argument("--demo-runs", type=int, default=20)
    ap.add_argument("--timeout", type=float, default=900, help="seconds per run")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/teardown_stress.md"))
    args = ap.parse_args()
    out = Path(args.out)
    log = out.with_suffix(".jsonl")
    log.write_text("")
    results = []
    for kind, count in (("phase", args.phase_runs), ("demo", args.demo_runs)):
        for i in range(count):
            r = run(kind, i, args.timeout)
            results.append(r)
            with log.open("a") as f:
                f.write(json.dumps(r) + "\n")
            print(f"{kind} {i + 1}/{count}: rc={r['rc']} aborted={r['aborted']} {r['seconds']} s", flush=True)
    lines = [
        "# Teardown stress: every launch must exit 0",
        "",
        "`python benchmarks/stress_teardown.py` (2 CPU cores, gloo, torch 2.13; other jobs shared the "
        "machine, so the times are not benchmarks).",
        "",
        "| launch | runs | exit 0 | failed | aborts at exit | teardown warnings | median seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind, label in (
        ("phase", "main job, first phase (`torchrun` 2 ranks, `--steps 40 --stop-at 20 --save`)"),
        ("demo", "full demo (`python -m microadam_dist.demo`)"),
    ):
        rs = [r for r in results if r["kind"] == kind]
        if not rs:
            continue
        secs = sorted(r["seconds"] for r in rs)
        lines.append(
            f"| {label} | {len(rs)} | {sum(r['rc'] == 0 for r in rs)} | {sum(r['rc'] != 0 for r in rs)} | "
            f"{sum(r['aborted'] for r in rs)} | {sum(r['teardown_warning'] for r in rs)} | "
            f"{secs[len(secs) // 2]} |"
        )
    failed = [r for r in results if r["rc"] != 0]
    if failed:
        lines += ["", "## Failed runs", ""]
        lines += [f"- {r['kind']} {r['index']}: rc {r['rc']}\n\n```\n{r['tail']}\n```" for r in failed]
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
