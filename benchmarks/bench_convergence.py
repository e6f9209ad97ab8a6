"""Convergence on CPU: MicroAdam beside AdamW and the 8-bit / 4-bit AdamW variants, on two tasks.

Task A is the main job's small GPT (2 layers, width 128, context 64) on the bundled CPython
documentation corpus: batch 12, 300 steps, linear warm-up (20 steps) then cosine decay to 0, no
weight decay; batches depend only on (seed, step) and the validation loss is the mean over 8
fixed batches of the validation split, both as in ``microadam_dist.train``. Task B is an MLP
(64-256-256-10, GELU) on scikit-learn's bundled 8x8 digits (1400 train / 397 test, fixed split,
standardized), mini-batches of 128 for 40 epochs with the same schedule shape.

For every optimizer and task the learning rate is tuned on seed 0 (best final validation / test
loss, every tuning run full length): a starting grid of factors of 3 around the best rate of
earlier runs, extended by a factor of 3 at whichever edge wins until the best rate is inside the
grid (at most --max-extend extensions; the report says "inside" or "edge"). Then seeds 1 and 2
run at that rate (seed 0's tuning run is reused). Reported: mean, standard deviation and min-max
of the final loss over the seeds, the ratio to AdamW, the exact optimizer-state bytes per
parameter (after training) and the wall seconds per run. Results go to results/convergence.md,
convergence_gpt.png and convergence_digits.png; the full run took 18 minutes on one thread of
the shared 2 cores (--threads 1).

    python benchmarks/bench_convergence.py --threads 1            # the full run
    python benchmarks/bench_convergence.py --quick --out /tmp/c   # CI-sized: 40 steps, 5 epochs, 1 seed
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from optimizers import make, state_bytes
from tuning import extend_grid, inside, lr_factor, set_lr

from microadam_dist.data import get_batch, split_corpus
from microadam_dist.models import GPT, GPTConfig

RESULTS = Path(__file__).parent / "results"
OPTIMIZERS = ["microadam", "microadam:alpha=0.5", "adamw", "bnb_adamw8bit", "torchao_adamw8bit", "torchao_adamw4bit"]


def around(lr: float) -> list[float]:
    return [lr / 3, lr, lr * 3]


# starting grids, tuned on the first seed and extended at a winning edge: a factor of 3 either side of
# the best rate of the earlier 3-point grids (2026-12-01), where every best rate sat at an edge. An
# optimizer without its own entry takes its family's: "microadam" for every microadam:... variant,
# "adam" for every Adam-family baseline.
GRIDS = {
    "gpt": {"microadam": around(2e-3), "microadam:alpha=0.5": around(5e-3), "adam": around(1e-3)},
    "digits": {"microadam": around(3e-3), "microadam:alpha=0.5": around(3e-3), "adam": around(1e-3)},
}


def start_grid(task: str, name: str) -> list[float]:
    grids = GRIDS[task]
    return grids.get(name) or grids["microadam" if name.startswith("microadam") else "adam"]


@dataclass
class Run:
    name: str
    lr: float
    seed: int
    length: int  # steps (GPT) or epochs (digits)
    final: float  # final validation (GPT) or test (digits) loss
    curve: list[float] = field(repr=False)  # training loss per step (GPT), test loss per epoch (digits)
    seconds: float = 0.0
    state_bytes: int = 0
    num_params: int = 0
    accuracy: float = float("nan")


# ---- task A: the small GPT -------------------------------------------------------------------------
class GPTTask:
    key, unit, metric = "gpt", "steps", "final val loss"

    def __init__(self, args):
        self.args = args
        self.train, self.val = split_corpus()

    @torch.no_grad()
    def evaluate(self, model: GPT) -> float:
        gen = torch.Generator().manual_seed(1234)  # the same 8 validation batches for every run
        model.eval()
        losses = [model(*get_batch(self.val, self.args.batch_size, self.args.context, gen)).item() for _ in range(8)]
        model.train()
        return sum(losses) / len(losses)

    def run(self, name: str, lr: float, seed: int, steps: int) -> Run:
        a = self.args
        torch.manual_seed(seed)
        model = GPT(GPTConfig(n_layer=a.layers, n_embd=a.width, n_head=a.heads, block_size=a.context))
        opt = make(name, model.parameters(), lr)
        losses = []
        start = time.perf_counter()
        for step in range(steps):
            set_lr(opt, lr * lr_factor(step, steps, a.warmup))
            # the batch depends only on (seed, step), as in train.py
            x, y = get_batch(self.train, a.batch_size, a.context, torch.Generator().manual_seed(seed * 100003 + step))
            loss = model(x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        seconds = time.perf_counter() - start
        return Run(
            name,
            lr,
            seed,
            steps,
            self.evaluate(model),
            losses,
            seconds,
            state_bytes(opt),
            sum(p.numel() for p in model.parameters()),
        )


# ---- task B: an MLP on the digits images -----------------------------------------------------------
class DigitsTask:
    key, unit, metric = "digits", "epochs", "final test loss"
    batch_size = 128

    def __init__(self, args):
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)  # bundled with scikit-learn: no download
        x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.long)
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))  # one fixed split
        tr, te = perm[:1400], perm[1400:]
        mean, std = x[tr].mean(0), x[tr].std(0)
        std[std == 0] = 1.0  # border pixels that are blank in every training image
        x = (x - mean) / std
        self.xtr, self.ytr, self.xte, self.yte = x[tr], y[tr], x[te], y[te]

    @torch.no_grad()
    def evaluate(self, model) -> tuple[float, float]:
        logits = model(self.xte)
        loss = torch.nn.functional.cross_entropy(logits, self.yte).item()
        return loss, (logits.argmax(1) == self.yte).float().mean().item()

    def run(self, name: str, lr: float, seed: int, epochs: int) -> Run:
        torch.manual_seed(seed)
        nn = torch.nn
        model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 10))
        opt = make(name, model.parameters(), lr)
        n = len(self.xtr)
        per_epoch = math.ceil(n / self.batch_size)
        total, warmup = epochs * per_epoch, per_epoch  # warm-up: one epoch
        test_losses, step = [], 0
        start = time.perf_counter()
        for epoch in range(epochs):
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
            for i in range(0, n, self.batch_size):
                idx = order[i : i + self.batch_size]
                set_lr(opt, lr * lr_factor(step, total, warmup))
                loss = nn.functional.cross_entropy(model(self.xtr[idx]), self.ytr[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
            test_losses.append(self.evaluate(model)[0])
        seconds = time.perf_counter() - start
        final, acc = self.evaluate(model)
        return Run(
            name,
            lr,
            seed,
            epochs,
            final,
            test_losses,
            seconds,
            state_bytes(opt),
            sum(p.numel() for p in model.parameters()),
            acc,
        )


# ---- the procedure -------------------------------------------------------------------------------
def _score(run: Run) -> float:
    return run.final if math.isfinite(run.final) else math.inf  # a diverged run never wins


def sweep(task, name: str, grid: list[float], seeds: list[int], length: int, max_extend: int) -> dict:
    """Tune the learning rate on seeds[0] (the grid extended at a winning edge), then every other seed
    at the best rate; every run has the full length."""

    def tune(lr: float) -> Run:
        r = task.run(name, lr, seeds[0], length)
        print(
            f"  [{task.key}] {name:>19} grid lr {lr:.3g} seed {seeds[0]}: {r.final:.4f} in {r.seconds:.1f} s",
            flush=True,
        )
        return r

    tried, best = extend_grid(tune, grid, _score, max_extend)
    runs = [tried[best]]
    for seed in seeds[1:]:
        r = task.run(name, best, seed, length)
        runs.append(r)
        print(
            f"  [{task.key}] {name:>19} lr {best:.3g} seed {seed}: {r.final:.4f}"
            + (f", accuracy {r.accuracy:.4f}" if math.isfinite(r.accuracy) else "")
            + f" in {r.seconds:.1f} s",
            flush=True,
        )
    return dict(
        name=name,
        lr=best,
        grid={lr: tried[lr].final for lr in sorted(tried)},
        start=list(grid),
        inside=inside(tried, best),
        runs=runs,
    )


def run_task(task, args, failed: dict) -> list[dict]:
    out = []
    length = args.steps if task.key == "gpt" else args.epochs
    for name in args.optimizers:
        grid = args.grids[task.key].get(name) or start_grid(task.key, name)
        if args.quick:
            grid = [grid[len(grid) // 2]]  # CI-sized: the middle rate only
        try:
            out.append(sweep(task, name, grid, args.seeds, length, args.max_extend))
        except Exception as e:  # an optimizer that cannot be built or stepped here: noted, not fatal
            failed[f"{name} ({task.key})"] = f"{type(e).__name__}: {e}"
            print(f"  [{task.key}] {name}: not run: {type(e).__name__}: {e}", flush=True)
    return out


# ---- report --------------------------------------------------------------------------------------
def summary(res: dict) -> dict:
    finals = [r.final for r in res["runs"]]
    accs = [r.accuracy for r in res["runs"]]  # NaN for the GPT (no accuracy)

    def sd(v):
        return statistics.stdev(v) if len(v) > 1 and all(map(math.isfinite, v)) else float("nan")

    last = res["runs"][-1]
    return dict(
        mean=statistics.fmean(finals),
        std=sd(finals),
        lo=min(finals),
        hi=max(finals),
        acc=statistics.fmean(accs),
        acc_std=sd(accs),
        bpp=last.state_bytes / last.num_params,
        num_params=last.num_params,
        seconds=statistics.median(r.seconds for r in res["runs"]),
        n=len(finals),
    )


def table(task, results: list[dict]) -> list[str]:
    sums = {res["name"]: summary(res) for res in results}
    base = sums.get("adamw", {}).get("mean")
    digits = task.key == "digits"
    head = f"| optimizer | lr (chosen) | {task.metric} mean ± std (min-max) | ratio to AdamW |"
    head += " test accuracy mean ± std |" if digits else ""
    lines = [head + " state bytes/param | wall s per run (median) |", "|---" * (7 if digits else 6) + "|"]
    for res in results:
        s = sums[res["name"]]
        ratio = f"{s['mean'] / base:.4f}" if base else "-"
        edge = "" if res["inside"] else " (edge)"
        row = (
            f"| {res['name']} | {res['lr']:.3g}{edge} | {s['mean']:.4f} ± {_num(s['std'])} "
            f"({s['lo']:.4f}-{s['hi']:.4f}) | {ratio} |"
        )
        row += f" {s['acc']:.4f} ± {_num(s['acc_std'])} |" if digits else ""
        lines.append(row + f" {s['bpp']:.3f} | {s['seconds']:.1f} |")
    tuned_on = results[0]["runs"][0].seed if results else 0
    lines += [
        "",
        f"Learning-rate grid ({task.metric} of the tuning run, seed {tuned_on}):",
        "",
        f"| optimizer | starting grid | {task.metric} per lr (every tried rate, full length) | best rate |",
        "|---|---|---|---|",
    ]
    edge = []
    for res in results:
        cells = ", ".join(
            f"{lr:.3g}: {v:.4f}" + (" **(chosen)**" if lr == res["lr"] else "") for lr, v in res["grid"].items()
        )
        start = ", ".join(f"{lr:.3g}" for lr in res["start"])
        where = "inside" if res["inside"] else "**edge**"
        where = where if len(res["grid"]) > 1 else "not tuned (one rate)"
        lines.append(f"| {res['name']} | {start} | {cells} | {where} |")
        if not res["inside"]:
            edge.append(res["name"])
    if edge:  # the grid may not bracket the best rate: a caveat for every comparison above
        lines += [
            "",
            f"The chosen rate is still at the edge of its extended grid for: {', '.join(edge)}; a rate "
            "further out might do better, so these comparisons hold for the grids given only.",
        ]
    return lines


def _num(v: float) -> str:
    return f"{v:.4f}" if math.isfinite(v) else "n/a"  # n/a: one seed, no spread


def goal_check(gpt: list[dict]) -> str:
    sums = {res["name"]: summary(res) for res in gpt}
    if "microadam" not in sums or "adamw" not in sums:
        return "MicroAdam or AdamW did not run on the GPT, so the goal cannot be checked."
    m, a = sums["microadam"], sums["adamw"]
    ratio = m["mean"] / a["mean"]
    within = ratio <= 1.02
    text = (
        f"On the GPT, MicroAdam's mean final validation loss is {m['mean']:.4f} (std {_num(m['std'])}) against "
        f"AdamW's {a['mean']:.4f} (std {_num(a['std'])}): a ratio of {ratio:.4f}, i.e. "
        f"{abs(ratio - 1) * 100:.2f}% {'higher' if ratio > 1 else 'lower'}, so the goal of being within 2% of "
        f"AdamW is {'met' if within else 'NOT met'} on this run."
    )
    eight = [n for n in ("bnb_adamw8bit", "torchao_adamw8bit") if n in sums]
    if not eight:
        return text + " No 8-bit AdamW ran, so the second comparison cannot be made."
    parts = []
    for n in eight:
        s = sums[n]
        d = m["mean"] - s["mean"]
        verdict = "at least as good (lower or equal loss)" if d <= 0 else "worse (higher loss)"
        part = f"{n} reaches {s['mean']:.4f} (std {_num(s['std'])}); MicroAdam is {verdict} by {abs(d):.4f}"
        if math.isfinite(s["std"]) and math.isfinite(m["std"]):
            noise = "smaller" if abs(d) < max(m["std"], s["std"]) else "larger"
            part += f", a difference {noise} than the larger of the two seed standard deviations"
        parts.append(part)
    return text + " Against 8-bit AdamW: " + "; ".join(parts) + "."


def smooth(v: list[float], k: int) -> list[float]:
    out, acc = [], 0.0
    for i, x in enumerate(v):  # trailing mean over the last k values
        acc += x - (v[i - k] if i >= k else 0.0)
        out.append(acc / min(i + 1, k))
    return out


def plot(results: list[dict], path: Path, title: str, xlabel: str, ylabel: str, k: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for res in results:
        curves = [r.curve for r in res["runs"]]
        n = min(map(len, curves))
        mean = smooth([statistics.fmean(c[i] for c in curves) for i in range(n)], k)
        xs = range(1, n + 1)
        ax.plot(xs, mean, label=f"{res['name']} (lr {res['lr']:.3g})")
        if len(curves) > 1:
            lo = smooth([min(c[i] for c in curves) for i in range(n)], k)
            hi = smooth([max(c[i] for c in curves) for i in range(n)], k)
            ax.fill_between(xs, lo, hi, alpha=0.15)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def write(out: Path, args, gpt: list[dict], digits: list[dict], failed: dict, info: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    seeds = ", ".join(map(str, args.seeds))
    proc = platform.processor() or platform.machine()
    machine = (
        f"Machine: {proc}{f' ({cpu_name()})' if cpu_name() else ''}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU only; one process. Load "
        f"average at start {info['load0']:.1f}, at end {info['load1']:.1f}: other processes shared the cores, "
        "so the wall seconds are indicative only (the losses do not depend on them); torchao's first run "
        "of each model shape also includes its torch.compile time (hence the median)."
    )
    if torch.get_num_threads() == 1:
        machine += (
            " One thread (--threads 1): on this shared 2-core machine two OpenMP threads wait on each other "
            "whenever another process holds a core, which made steps several times slower in trial runs."
        )
    n_gpt = sum(len(r["grid"]) + len(r["runs"]) - 1 for r in gpt)
    n_dig = sum(len(r["grid"]) + len(r["runs"]) - 1 for r in digits)
    lines = [
        "# Convergence: MicroAdam against AdamW and 8-/4-bit AdamW",
        "",
        machine,
        "",
        f"Run {'(--quick) ' if args.quick else ''}took {info['minutes']:.1f} minutes: {n_gpt} GPT runs and "
        f"{n_dig} digits runs; seeds {seeds} at the chosen learning rate, tuned on seed {args.seeds[0]}: a "
        "starting grid of factors of 3, extended by a factor of 3 at whichever edge wins until the best rate is "
        f"strictly inside (at most {args.max_extend} extensions), every tuning run at the full length. "
        f"Command: `python benchmarks/bench_convergence.py {' '.join(sys.argv[1:])}`. "
        "Weight decay 0 for every optimizer; MicroAdam at its defaults (window 10, density 0.01, block 4096, "
        "quantization buckets 2048, alpha 0) except where its name sets an option "
        "(`microadam:alpha=0.5`: the authors' densification, same state memory). "
        "`adamw` is torch.optim.AdamW(foreach=True); the fused AdamW is the same "
        "algorithm (numerically the same up to rounding), so it is not run separately. State bytes/param: "
        "exact bytes of the optimizer state after training (MicroAdam: `state_bytes()`; torchao: the inner "
        "tensors of its quantized state; a storage shared between parameters counted once) divided by the "
        "model's parameter count. Parameters under 4096 elements keep 32-bit state in bitsandbytes and "
        "torchao, which is why their figures exceed 2 (8-bit) and 1 (4-bit).",
        "",
    ]
    a = args
    lines += [
        "## A. Small GPT on the CPython documentation corpus",
        "",
        f"GPT(n_layer={a.layers}, n_embd={a.width}, n_head={a.heads}, block_size={a.context}), "
        f"{gpt[0]['runs'][-1].num_params if gpt else '?':,} parameters; batch {a.batch_size}, {a.steps} steps, "
        f"linear warm-up {a.warmup} steps then cosine decay to 0; validation loss = mean over 8 fixed batches "
        "of the validation split (generator seeded 1234), as in microadam_dist.train.",
        "",
    ]
    lines += table(GPTTask, gpt) + [""]
    lines += [
        "## B. MLP on scikit-learn's digits",
        "",
        f"64-256-256-10 MLP with GELU, {digits[0]['runs'][-1].num_params if digits else '?':,} parameters; "
        f"1400 train / 397 test images (fixed permutation, standardized with the training statistics), "
        f"cross-entropy, mini-batches of {DigitsTask.batch_size}, {a.epochs} epochs, warm-up one epoch then "
        "cosine decay to 0. State bytes/param here are measured on this MLP.",
        "",
    ]
    lines += table(DigitsTask, digits) + [""]
    lines += ["## Optimizers that did not run", ""]
    lines += [f"- {k}: {v}" for k, v in failed.items()] or ["- none: every optimizer ran on both tasks."]
    lines += [
        "",
        "## Goal check",
        "",
        goal_check(gpt),
        "",
        f"These are small models, short runs and {len(args.seeds)} seed(s) on one machine; the learning rates "
        "are tuned on one seed over a grid with steps of a factor of 3, so differences of the order of the seed "
        "standard deviation are not meaningful.",
        "",
        "Plots: convergence_gpt.png (training loss, trailing mean over 10 steps, mean over seeds, band = "
        "min-max over seeds) and convergence_digits.png (test loss per epoch, same idea).",
        "",
    ]
    (out / "convergence.md").write_text("\n".join(lines))
    plot(
        gpt,
        out / "convergence_gpt.png",
        "Small GPT: training loss at the chosen lr",
        "step",
        "training loss (10-step mean)",
        10,
    )
    plot(digits, out / "convergence_digits.png", "Digits MLP: test loss at the chosen lr", "epoch", "test loss", 1)
    print(f"wrote {out / 'convergence.md'}, convergence_gpt.png and convergence_digits.png", flush=True)


def _rates(v: list[float]) -> str:
    return ",".join(f"{lr:.3g}" for lr in v)


def parse_grid(text: str) -> tuple[str, list[float]]:
    name, _, rates = text.rpartition("=")  # the name itself may hold '=': microadam:alpha=0.5=1e-3,3e-3
    try:
        grid = sorted(float(r) for r in rates.split(","))
    except ValueError:
        grid = []
    if not name or not grid or min(grid) <= 0:
        raise SystemExit(f"grid {text!r}: write NAME=LR,LR,... with positive rates, e.g. microadam=1e-3,3e-3,1e-2")
    return name, grid


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CI-sized: 40 steps, 5 epochs, 1 seed, 1 lr per optimizer")
    ap.add_argument(
        "--out",
        default=None,
        help="output directory (default benchmarks/results; --quick without --out writes to a temporary directory)",
    )
    ap.add_argument("--steps", type=int, default=None, help="GPT steps (default 300, --quick 40)")
    ap.add_argument("--epochs", type=int, default=None, help="digits epochs (default 40, --quick 5)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 (--quick: 0)")
    ap.add_argument(
        "--optimizers",
        nargs="+",
        default=OPTIMIZERS,
        help="names from benchmarks/optimizers.py; microadam:density=0.02,window_size=5 for a variant",
    )
    for task in GRIDS:
        ap.add_argument(
            f"--{task}-grid",
            action="append",
            default=[],
            metavar="NAME=LR,LR,...",
            help=f"starting {task} grid for one optimizer (repeatable); NAME may be a family, 'microadam' or "
            f"'adam' (default {', '.join(f'{k}={_rates(v)}' for k, v in GRIDS[task].items())})",
        )
    ap.add_argument("--max-extend", type=int, default=3, help="grid extensions per optimizer and task")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (1 is steadier on a busy machine)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=20)
    args = ap.parse_args(argv)
    args.grids = {task: dict(parse_grid(g) for g in getattr(args, f"{task}_grid")) for task in GRIDS}
    for task, grids in args.grids.items():  # a family's grid applies to every member without its own
        GRIDS[task].update({k: v for k, v in grids.items() if k in ("microadam", "adam")})
    args.steps = args.steps or (40 if args.quick else 300)
    args.epochs = args.epochs or (5 if args.quick else 40)
    args.seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    out = Path(args.out) if args.out else (Path(tempfile.mkdtemp(prefix="convergence_")) if args.quick else RESULTS)
    torch.set_num_threads(args.threads)
    start, load0 = time.perf_counter(), os.getloadavg()[0]
    failed: dict[str, str] = {}

    print(f"digits: {args.epochs} epochs, seeds {args.seeds}", flush=True)
    digits = run_task(DigitsTask(args), args, failed)
    print(f"gpt: {args.steps} steps, seeds {args.seeds}", flush=True)
    gpt = run_task(GPTTask(args), args, failed)

    info = dict(
        load0=load0,
        load1=os.getloadavg()[0],
        minutes=(time.perf_counter() - start) / 60,
    )
    write(out, args, gpt, digits, failed, info)
    print(f"total {info['minutes']:.1f} minutes", flush=True)


if __name__ == "__main__":
    main()
