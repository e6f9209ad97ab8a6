"""Soak: thousands of training steps in save / reshard / resume cycles, invariants checked at every save.

The main job (FSDP2, MicroAdam, a small GPT) runs in cycles under torchrun, alternating the world
size (2, 1, 2, ...). Each cycle resumes from the last checkpoint (``--auto-resume``), trains, saves
every ``--save-every`` steps and at its end. After each cycle the checkpoint is read back with
``microadam_dist.checkpoint``: every parameter's state is checked (dtypes, shapes, window indices
inside their blocks, ordered finite bucket statistics, step counts equal to the job's step), and
every second cycle the checkpoint goes through the tool (DCP -> canonical -> DCP) and the next
cycle resumes from the round trip, which must hold the same state bitwise. Writes
results/soak.md and results/soak.png.

    python benchmarks/soak.py                      # 3000 steps in 10 cycles, ~5 minutes on 2 cores
    python benchmarks/soak.py --steps 200 --cycles 4 --out /tmp/soak   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from microadam_dist import checkpoint
from microadam_dist.distributed import torchrun_command
from microadam_dist.state import FIELDS

MODEL = [
    "--width",
    "64",
    "--context",
    "32",
    "--layers",
    "2",
    "--heads",
    "2",
    "--batch-size",
    "12",
    "--optimizers",
    "microadam",
    "--quiet",
]


def torchrun(nproc: int, args: list[str]) -> None:
    subprocess.run(
        torchrun_command(nproc, args), check=True, stdout=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )


def verify(path: Path, step: int) -> int:
    """Every parameter's state checked; returns how many parameters were checked."""
    ckpt = checkpoint.open_checkpoint(path)
    assert ckpt.step == step, (ckpt.step, step)
    for name in ckpt.params:
        st = ckpt.checked_state(name)
        assert st is not None and int(st["step"]) == step, (name, None if st is None else int(st["step"]))
    return len(ckpt.params)


def same_state(a: Path, b: Path) -> bool:
    x, y = checkpoint.open_checkpoint(a), checkpoint.open_checkpoint(b)
    return all(
        torch.equal(x.weight(n), y.weight(n)) and all(torch.equal(x.state(n)[k], y.state(n)[k]) for k in FIELDS)
        for n in x.params
    )


def round_trip(ckpt_dir: Path, work: Path) -> bool:
    """DCP -> canonical -> DCP through the tool; the job then resumes from the result."""
    shutil.rmtree(work, ignore_errors=True)
    tool = [sys.executable, "-m", "microadam_dist.cli"]
    subprocess.run([*tool, "convert", ckpt_dir, work / "canonical", "--to", "single", "--quiet"], check=True)
    subprocess.run([*tool, "convert", work / "canonical", work / "dcp", "--to", "dcp", "--quiet"], check=True)
    ok = same_state(ckpt_dir, work / "dcp")
    meta = json.loads((ckpt_dir / "train_meta.json").read_text())
    (work / "dcp" / "train_meta.json").write_text(json.dumps(meta))  # the job's own bookkeeping
    shutil.rmtree(ckpt_dir)
    (work / "dcp").rename(ckpt_dir)
    return ok


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--cycles", type=int, default=10)
    ap.add_argument("--save-every", type=int, default=50)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--workdir", type=Path, default=Path("runs/soak"))
    args = ap.parse_args(argv)
    shutil.rmtree(args.workdir, ignore_errors=True)
    ckpt = args.workdir / "ckpt"
    per_cycle = args.steps // args.cycles
    rows, started = [], time.perf_counter()
    for cycle in range(args.cycles):
        world = 2 if cycle % 2 == 0 else 1
        stop = args.steps if cycle == args.cycles - 1 else (cycle + 1) * per_cycle
        t = time.perf_counter()
        torchrun(
            world,
            [
                *MODEL,
                "--steps",
                str(args.steps),
                "--stop-at",
                str(stop),
                "--save",
                str(ckpt),
                "--save-every",
                str(args.save_every),
                "--auto-resume",
                "--out",
                str(args.workdir / "out"),
            ],
        )
        seconds = time.perf_counter() - t
        checked = verify(ckpt / "microadam", stop)
        tool_ok = round_trip(ckpt / "microadam", args.workdir / "tool") if cycle % 2 == 1 else None
        losses = json.loads((args.workdir / "out" / "losses_microadam.json").read_text())["losses"]
        rows.append((cycle, world, stop, losses[-1], checked, tool_ok, seconds))
        print(
            f"cycle {cycle}: world size {world}, steps to {stop}, loss {losses[-1]:.4f}, {checked} parameters "
            f"verified, tool round trip {tool_ok}, {seconds:.1f} s",
            flush=True,
        )
    total = time.perf_counter() - started
    run = json.loads((args.workdir / "out" / "losses_microadam.json").read_text())
    losses = run["losses"]
    assert len(losses) == args.steps
    args.out.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Soak: save / reshard / resume cycles",
        "",
        f"The main job (FSDP2, MicroAdam, GPT 2 x 64, batch 12, context 32) for {args.steps} steps in "
        f"{args.cycles} cycles alternating 2 and 1 ranks under torchrun, saving every {args.save_every} steps; "
        "after each cycle every parameter's state is checked (dtypes, shapes, indices inside their blocks, ordered "
        "finite statistics, step counts), and every second cycle the checkpoint goes DCP -> canonical -> DCP "
        "through microadam-ckpt and the next cycle resumes from that. One run on "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; "
        f"{total:.0f} s in all.",
        "",
        "| cycle | world size | step reached | training loss | parameters verified | tool round trip bitwise "
        "| seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for cycle, world, stop, loss, checked, tool_ok, seconds in rows:
        lines.append(
            f"| {cycle} | {world} | {stop} | {loss:.4f} | {checked} | "
            f"{'-' if tool_ok is None else ('yes' if tool_ok else 'NO')} | {seconds:.1f} |"
        )
    lines += [
        "",
        f"Resumes recorded by the job: {len(run['history'])} (world sizes "
        f"{[h['world_size'] for h in run['history']]}); final validation loss {run['val_loss']:.4f}.",
    ]
    (args.out / "soak.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    smooth = [sum(losses[max(0, i - 19) : i + 1]) / len(losses[max(0, i - 19) : i + 1]) for i in range(len(losses))]
    ax.plot(range(1, len(losses) + 1), losses, alpha=0.25, color="tab:red")
    ax.plot(range(1, len(losses) + 1), smooth, color="tab:red", label="MicroAdam (20-step mean)")
    for cycle, world, stop, *_ in rows[:-1]:
        ax.axvline(stop, color="gray", linewidth=0.6, linestyle="--")
    ax.set(xlabel="step", ylabel="training loss", title="Soak: resumed every cycle, alternating 2 and 1 ranks")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "soak.png", dpi=110)
    print("\n".join(lines))
    if any(r[5] is False for r in rows):
        raise SystemExit("a tool round trip changed the state")


if __name__ == "__main__":
    main()
