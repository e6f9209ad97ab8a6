"""Fine-tuning on CPU, the regime MicroAdam was designed for: MicroAdam beside AdamW and the
8-bit / 4-bit AdamW variants, starting from one pretrained model.

Pretraining (once, cached under benchmarks/.cache/finetune/): a byte-level GPT (default 4 layers,
width 256, context 64: 3.3M parameters) trained with AdamW on the bundled CPython documentation
(``microadam_dist.data``, English prose). Fine-tuning: the same model on a clearly different text,
Python source code: the source files of eight standard-library modules (argparse, dataclasses,
functools, inspect, typing, textwrap, shutil, contextlib; fixed for a Python version), 90% train /
10% validation by position. Batch 8 x 64 bytes, linear warm-up then cosine decay to 0, no
weight decay, the batches depending only on (seed, step); the reported loss is the mean over 8
fixed validation batches of the fine-tuning text (and, to show forgetting, of the documentation).

Per optimizer the learning rate is tuned on seed 0 over a grid of factors of 3, extended by a
factor of 3 at whichever edge wins until the best rate is inside the grid (at most --max-extend
extensions); then seeds 1 and 2 run at the best rate (seed 0's tuning run is reused). Reported:
mean, std and min-max of the final validation loss over the 3 seeds, the ratio to AdamW, the exact
optimizer-state bytes per parameter, wall seconds per run. Every run is cached (JSON, keyed by its
settings), so an interrupted benchmark resumes where it stopped.

Everything runs on ONE thread (``torch.set_num_threads(1)``): the CPU here is shared.

    python benchmarks/bench_finetune.py                       # the full set (about 15 min of one core)
    python benchmarks/bench_finetune.py --optimizers adamw,microadam --seeds 1
    python benchmarks/bench_finetune.py --quick --out /tmp/f   # a smoke test: tiny model, 10 steps
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from optimizers import make, state_bytes
from tuning import extend_grid, inside, lr_factor, set_lr

from microadam_dist.data import get_batch, split_corpus
from microadam_dist.models import GPT, GPTConfig

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CACHE = HERE / ".cache" / "finetune"
FINETUNE_MODULES = ["argparse", "dataclasses", "functools", "inspect", "typing", "textwrap", "shutil", "contextlib"]
OPTIMIZERS = [
    "adamw",
    "microadam",
    "torchao_adamw4bit",
    "bnb_adamw8bit",
    "microadam:window_size=20",
    "microadam:alpha=0.5",
    "torchao_adamw8bit",
]
LABELS = {
    "adamw": "AdamW (fp32)",
    "microadam": "MicroAdam (defaults: m=10, 1%)",
    "microadam:window_size=20": "MicroAdam m=20",
    "microadam:alpha=0.5": "MicroAdam alpha=0.5",
    "bnb_adamw8bit": "bitsandbytes AdamW8bit",
    "torchao_adamw8bit": "torchao AdamW8bit",
    "torchao_adamw4bit": "torchao AdamW4bit",
}
# starting grids (factors of 3), extended at a winning edge; MicroAdam's best rates in the 40-step run were
# 3e-3 (its grid started at 1e-4 then)
GRIDS = {"microadam": [3e-4, 1e-3, 3e-3], "adam": [3e-4, 1e-3, 3e-3]}


def finetune_corpus() -> tuple[torch.Tensor, torch.Tensor]:
    text = "\n\n".join(inspect.getsource(importlib.import_module(m)) for m in FINETUNE_MODULES)
    data = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()
    cut = int(len(data) * 0.9)
    return data[:cut], data[cut:]


class Bench:
    def __init__(self, a):
        self.a = a
        self.cfg = GPTConfig(n_layer=a.layers, n_embd=a.width, n_head=a.heads, block_size=a.context)
        self.pre_train, self.pre_val = split_corpus()
        self.ft_train, self.ft_val = finetune_corpus()
        self.cache = Path(a.cache)
        self.cache.mkdir(parents=True, exist_ok=True)
        self.key = hashlib.sha256(
            json.dumps(
                [
                    vars(self.cfg),
                    a.pretrain_steps,
                    a.pretrain_lr,
                    a.batch_size,
                    FINETUNE_MODULES,
                    platform.python_version(),
                    torch.__version__,
                ]
            ).encode()
        ).hexdigest()[:12]

    @torch.no_grad()
    def evaluate(self, model: GPT, data: torch.Tensor) -> float:
        gen = torch.Generator().manual_seed(1234)  # the same 8 batches for every run
        model.eval()
        losses = [model(*get_batch(data, self.a.batch_size, self.a.context, gen)).item() for _ in range(8)]
        model.train()
        return sum(losses) / len(losses)

    def pretrained(self) -> dict:
        path = self.cache / f"pretrained-{self.key}.pt"
        if path.exists():
            return torch.load(path, weights_only=True)
        a = self.a
        torch.manual_seed(0)
        model = GPT(self.cfg)
        opt = make("adamw", model.parameters(), a.pretrain_lr)
        start = time.perf_counter()
        for step in range(a.pretrain_steps):
            set_lr(opt, a.pretrain_lr * lr_factor(step, a.pretrain_steps, max(1, a.pretrain_steps // 20)))
            x, y = get_batch(self.pre_train, a.batch_size, a.context, torch.Generator().manual_seed(step))
            loss = model(x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % 100 == 0:
                print(f"  pretrain step {step}: loss {loss.item():.3f}", flush=True)
        out = {
            "state": model.state_dict(),
            "seconds": time.perf_counter() - start,
            "doc_val": self.evaluate(model, self.pre_val),
            "code_val": self.evaluate(model, self.ft_val),
        }
        torch.save(out, path)
        return out

    def run(self, name: str, lr: float, seed: int) -> dict:
        a = self.a
        rkey = hashlib.sha256(json.dumps([self.key, name, lr, seed, a.steps, a.warmup]).encode()).hexdigest()[:16]
        path = self.cache / f"run-{rkey}.json"
        if path.exists():
            return json.loads(path.read_text())
        torch.manual_seed(seed)
        model = GPT(self.cfg)
        model.load_state_dict(self.pretrained()["state"])
        opt = make(name, model.parameters(), lr)
        losses = []
        start = time.perf_counter()
        for step in range(a.steps):
            set_lr(opt, lr * lr_factor(step, a.steps, a.warmup))
            x, y = get_batch(
                self.ft_train, a.batch_size, a.context, torch.Generator().manual_seed(seed * 100003 + step)
            )
            loss = model(x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        seconds = time.perf_counter() - start
        final = self.evaluate(model, self.ft_val)
        out = dict(
            name=name,
            lr=lr,
            seed=seed,
            final=final if math.isfinite(final) else float("inf"),
            doc_val=self.evaluate(model, self.pre_val),
            curve=losses,
            seconds=seconds,
            bpp=state_bytes(opt) / sum(p.numel() for p in model.parameters()),
        )
        path.write_text(json.dumps(out))
        print(
            f"  {name:>26} lr {lr:g} seed {seed}: val {out['final']:.4f} (docs {out['doc_val']:.4f}) "
            f"in {seconds:.0f} s",
            flush=True,
        )
        return out

    def sweep(self, name: str, fixed_lr: float | None = None) -> dict:
        grid = list(GRIDS["microadam" if name.startswith("microadam") else "adam"])
        if self.a.quick:
            grid = grid[1:2]
        if fixed_lr is not None:  # not tuned: the rate chosen for its base optimizer
            grid = [fixed_lr]
        tried, best = extend_grid(lambda lr: self.run(name, lr, 0), grid, lambda r: r["final"], self.a.max_extend)
        runs = [tried[best]] + [self.run(name, best, s) for s in range(1, self.a.seeds)]
        return dict(
            name=name,
            lr=best,
            grid={lr: tried[lr]["final"] for lr in sorted(tried)},
            runs=runs,
            inside=inside(tried, best),
            tuned=fixed_lr is None,
        )


# ---- report --------------------------------------------------------------------------------------
def summary(res: dict) -> dict:
    f = [r["final"] for r in res["runs"]]
    d = [r["doc_val"] for r in res["runs"]]
    sd = statistics.stdev(f) if len(f) > 1 else float("nan")
    return dict(
        mean=statistics.fmean(f),
        std=sd,
        lo=min(f),
        hi=max(f),
        doc=statistics.fmean(d),
        n=len(f),
        bpp=res["runs"][0]["bpp"],
        seconds=statistics.median(r["seconds"] for r in res["runs"]),
    )


def report(bench: Bench, results: list[dict], failed: dict, out: Path, wall: float) -> None:
    a, pre = bench.a, bench.pretrained()
    nparams = sum(p.numel() for p in GPT(bench.cfg).parameters())
    sums = {r["name"]: summary(r) for r in results}
    base = sums.get("adamw")
    lines = [
        "# Fine-tuning benchmark (bench_finetune.py)",
        "",
        f"Model: byte-level GPT, {a.layers} layers, width {a.width}, {a.heads} heads, context {a.context}: "
        f"**{nparams / 1e6:.2f}M parameters**. Pretrained once with AdamW (lr {a.pretrain_lr:g}, "
        f"{a.pretrain_steps} steps of batch {a.batch_size}) on the CPython documentation topics: "
        f"validation loss {pre['doc_val']:.4f} on the documentation, {pre['code_val']:.4f} on the "
        f"fine-tuning text before fine-tuning.",
        f"Fine-tuning text: the source of {', '.join(FINETUNE_MODULES)} (Python {platform.python_version()}), "
        f"{len(bench.ft_train) / 1e3:.0f} kB train / {len(bench.ft_val) / 1e3:.0f} kB validation. "
        f"{a.steps} steps of batch {a.batch_size} x {a.context} bytes, warm-up {a.warmup}, cosine to 0, "
        "no weight decay. Learning rate tuned on seed 0 (grid of factors of 3, extended until the best "
        f"rate is inside), then {a.seeds} seeds at that rate (seed = batch order).",
        f"One thread (torch {torch.__version__}, {platform.machine()}), wall {wall / 60:.1f} min for the runs "
        "not already cached.",
        "",
        f"Command: `python benchmarks/bench_finetune.py {' '.join(sys.argv[1:])}`",
        "",
        "| optimizer | lr (chosen) | final val loss mean ± std (min-max) | ratio to AdamW | "
        "docs val loss after (forgetting) | state bytes/param | wall s per run |",
        "|---|---|---|---|---|---|---|",
    ]
    for res in results:
        s = sums[res["name"]]
        ratio = f"{s['mean'] / base['mean']:.4f}" if base else "-"
        note = "" if res["inside"] else " (edge)"
        note = note if res.get("tuned", True) else " (base optimizer's, not tuned)"
        lines.append(
            f"| {LABELS.get(res['name'], res['name'])} | {res['lr']:g}{note} | "
            f"{s['mean']:.4f} ± {s['std']:.4f} ({s['lo']:.4f}-{s['hi']:.4f}) | {ratio} | "
            f"{s['doc']:.4f} | {s['bpp']:.3f} | {s['seconds']:.0f} |"
        )
    lines += [
        "",
        "Learning-rate grid (final validation loss of the seed-0 run):",
        "",
        "| optimizer | val loss per lr |",
        "|---|---|",
    ]
    for res in results:
        cells = ", ".join(
            f"{lr:g}: {v:.4f}" + (" **(chosen)**" if lr == res["lr"] else "") for lr, v in res["grid"].items()
        )
        lines.append(f"| {LABELS.get(res['name'], res['name'])} | {cells} |")
    edge = [LABELS.get(r["name"], r["name"]) for r in results if not r["inside"] and r.get("tuned", True)]
    if edge:
        lines += ["", f"Best rate still at the edge of its (extended) grid: {', '.join(edge)}."]
    if failed:
        lines += ["", "Not run here: " + "; ".join(f"{k}: {v}" for k, v in failed.items())]
    out.mkdir(parents=True, exist_ok=True)
    (out / "finetune.md").write_text("\n".join(lines) + "\n")
    try:
        plot(results, sums, out)
    except ImportError:
        print("matplotlib missing: no plots")
    print("\n".join(lines))


def plot(results: list[dict], sums: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(17, 5))
    for res in results:
        label = LABELS.get(res["name"], res["name"])
        lrs = list(res["grid"])
        ax1.plot(lrs, [res["grid"][lr] for lr in lrs], "o-", label=label)
        s = sums[res["name"]]
        ax2.errorbar(
            [s["bpp"]],
            [s["mean"]],
            yerr=[[s["mean"] - s["lo"]], [s["hi"] - s["mean"]]],
            fmt="o",
            capsize=4,
            label=label,
        )
        curves = [r["curve"] for r in res["runs"]]
        mean = [statistics.fmean(c[i] for c in curves) for i in range(len(curves[0]))]
        w = 5  # moving average over 5 steps
        ax3.plot([statistics.fmean(mean[max(0, i - w + 1) : i + 1]) for i in range(len(mean))], label=label)
    ax1.set(xscale="log", xlabel="learning rate", ylabel="final val loss (seed 0)", title="learning-rate grids")
    ax2.set(
        xscale="log",
        xlabel="optimizer state bytes / parameter",
        ylabel="final val loss (mean, min-max of seeds)",
        title="quality vs memory",
    )
    ax3.set(
        xlabel="fine-tuning step",
        ylabel="training loss (mean of seeds, 5-step average)",
        title="training curves at the chosen rate",
    )
    ax2.set_xticks([1, 2, 4, 8], ["1", "2", "4", "8"])
    ax2.minorticks_off()
    for ax in (ax1, ax2, ax3):
        ax.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "finetune.png", dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--pretrain-steps", type=int, default=400)
    ap.add_argument("--pretrain-lr", type=float, default=3e-3)
    ap.add_argument("--steps", type=int, default=60, help="fine-tuning steps")
    ap.add_argument("--warmup", type=int, default=6)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--max-extend", type=int, default=3, help="grid extensions per optimizer")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--reuse-lr",
        default="",
        help="comma-separated optimizers run at the rate chosen for their "
        "base (microadam for microadam:..., adamw otherwise; listed earlier) instead of a grid",
    )
    ap.add_argument("--cache", default=str(CACHE))
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--quick", action="store_true", help="smoke test: tiny model, 10 steps, 1 seed, 1 lr")
    a = ap.parse_args()
    if a.quick:
        a.layers, a.width, a.pretrain_steps, a.steps, a.warmup, a.seeds = 1, 64, 20, 10, 2, 1
    torch.set_num_threads(a.threads)
    bench = Bench(a)
    start = time.perf_counter()
    pre = bench.pretrained()
    print(f"pretrained: docs val {pre['doc_val']:.4f}, code val {pre['code_val']:.4f}", flush=True)
    results, failed = [], {}
    reuse = set(filter(None, a.reuse_lr.split(",")))
    for name in a.optimizers.split(","):
        base = "microadam" if name.startswith("microadam") else "adamw"
        chosen = {r["name"]: r["lr"] for r in results}
        if name in reuse and base not in chosen:
            raise SystemExit(f"--reuse-lr {name}: list {base} before it in --optimizers")
        try:
            results.append(bench.sweep(name, chosen[base] if name in reuse else None))
        except (ImportError, RuntimeError) as e:  # an optimizer that cannot run here: noted, not fatal
            failed[name] = f"{type(e).__name__}: {str(e)[:200]}"
            print(f"  {name}: not run: {failed[name]}", flush=True)
        report(bench, results, failed, Path(a.out), time.perf_counter() - start)  # partial results kept


if __name__ == "__main__":
    main()
