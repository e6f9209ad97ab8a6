"""The README's main job, end to end, on one machine with nothing downloaded.

1. torchrun starts 2 processes that train a small GPT on CPython's bundled documentation with
   FSDP2 (or DeepSpeed ZeRO with ``--engine deepspeed``), once with MicroAdam and once with AdamW,
   and save a checkpoint halfway;
2. torchrun starts 3 processes that resume both runs from that checkpoint (a different world
   size: the optimizer state is resharded on load) and finish them;
3. the loss curves of both optimizers are plotted to ``<out>/loss_curve.png``.

    python -m microadam_dist.demo                  # about two minutes on 2 CPU cores
    python -m microadam_dist.demo --steps 40       # a quick look
    python -m microadam_dist.demo --engine deepspeed  # the same with DeepSpeed ZeRO-2

Options it does not know go to ``microadam_dist.train`` (``--engine``, ``--deepspeed-config``, ...).
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

from .distributed import torchrun_command


def torchrun(nproc: int, train_args: list[str]) -> None:
    cmd = torchrun_command(nproc, train_args)
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True)


ENGINES = {"fsdp": "FSDP2", "deepspeed": "DeepSpeed ZeRO"}


def plot(out: Path, resume_step: int) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, color in (("microadam", "tab:red"), ("adamw", "tab:blue")):
        run = json.loads((out / f"losses_{name}.json").read_text())
        losses = run["losses"]
        smooth = [sum(losses[max(0, i - 9) : i + 1]) / len(losses[max(0, i - 9) : i + 1]) for i in range(len(losses))]
        label = (
            f"{'MicroAdam' if name == 'microadam' else 'AdamW'}: val {run['val_loss']:.3f}, "
            f"state {run['state_bytes_total'] / run['num_params']:.2f} B/param"
        )
        ax.plot(range(1, len(losses) + 1), losses, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(range(1, len(losses) + 1), smooth, color=color, label=label)
    worlds = " -> ".join(str(h["world_size"]) for h in run["history"])
    ax.axvline(resume_step, color="gray", linestyle="--", linewidth=1)
    ax.text(resume_step, ax.get_ylim()[1], f"  resumed (world size {worlds})", va="top", color="gray")
    ax.set(
        xlabel="step",
        ylabel="training loss (nats / byte)",
        title=f"GPT on CPython's documentation, {ENGINES[run.get('engine', 'fsdp')]}: MicroAdam vs AdamW",
    )
    ax.legend()
    fig.tight_layout()
    path = out / "loss_curve.png"
    fig.savefig(path, dpi=120)
    return path


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--workers", type=int, default=2, help="processes of the first half")
    ap.add_argument("--resume-workers", type=int, default=3, help="processes after the resume")
    ap.add_argument("--out", default="runs/demo")
    ap.add_argument("--quiet", action="store_true")
    args, train_extra = ap.parse_known_args(argv)
    out = Path(args.out)
    common = ["--steps", str(args.steps), "--out", str(out), *train_extra] + (["--quiet"] if args.quiet else [])
    half = args.steps // 2
    torchrun(args.workers, [*common, "--stop-at", str(half), "--save", str(out / "ckpt")])
    torchrun(args.resume_workers, [*common, "--resume", str(out / "ckpt"), "--save", str(out / "ckpt")])
    path = plot(out, half)
    print(f"loss curves: {path}\ncheckpoints: {out / 'ckpt'}")
    return path


if __name__ == "__main__":
    main()
