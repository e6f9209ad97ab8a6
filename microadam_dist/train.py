"""The main job: a small GPT trained on CPython's bundled documentation, MicroAdam beside AdamW.

    python -m microadam_dist.train            # defaults: a couple of minutes on 2 CPU cores
    python -m microadam_dist.train --steps 50 # quicker

Both optimizers start from the same weights and see the same batches; the job prints the loss
curves, the final validation loss and the exact optimizer-state bytes of each.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from .data import get_batch, split_corpus
from .models import GPT, GPTConfig
from .optimizer import MicroAdam


@dataclass
class RunResult:
    name: str
    losses: list[float]
    val_loss: float
    state_bytes: int
    num_params: int
    seconds: float


def adamw_state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
               if isinstance(t, torch.Tensor))


@torch.no_grad()
def evaluate(model: GPT, data: torch.Tensor, args, batches: int = 8) -> float:
    gen = torch.Generator().manual_seed(1234)
    model.eval()
    losses = [model(*get_batch(data, args.batch_size, args.context, gen)).item() for _ in range(batches)]
    model.train()
    return sum(losses) / len(losses)


def train_one(name: str, args) -> RunResult:
    torch.manual_seed(args.seed)
    model = GPT(GPTConfig(n_layer=args.layers, n_embd=args.width, n_head=args.heads, block_size=args.context))
    if name == "microadam":
        opt = MicroAdam(model.parameters(), lr=args.lr_microadam, weight_decay=args.weight_decay)
        state_bytes = opt.state_bytes
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr_adamw, weight_decay=args.weight_decay)
        state_bytes = lambda: adamw_state_bytes(opt)  # noqa: E731
    train, val = split_corpus()
    gen = torch.Generator().manual_seed(args.seed)
    losses = []
    start = time.perf_counter()
    bar = tqdm(range(args.steps), desc=f"{name:>9}", disable=args.quiet, ncols=100)
    for step in bar:
        # cosine schedule after a short warm-up, the same for both optimizers
        frac = min(1.0, (step + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for g in opt.param_groups:
            g["lr"] = (args.lr_microadam if name == "microadam" else args.lr_adamw) * frac
        x, y = get_batch(train, args.batch_size, args.context, gen)
        loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    seconds = time.perf_counter() - start
    n = sum(p.numel() for p in model.parameters())
    return RunResult(name, losses, evaluate(model, val, args), state_bytes(), n, seconds)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--lr-microadam", type=float, default=3e-3)
    ap.add_argument("--lr-adamw", type=float, default=3e-3)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    return ap.parse_args(argv)


def main(argv=None) -> list[RunResult]:
    args = parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results = [train_one(name, args) for name in ("microadam", "adamw")]
    every = max(1, args.steps // 10)
    print(f"\n{'step':>6} " + " ".join(f"{r.name:>10}" for r in results))
    for s in range(every - 1, args.steps, every):
        window = slice(max(0, s - every + 1), s + 1)
        print(f"{s + 1:>6} " + " ".join(f"{sum(r.losses[window]) / len(r.losses[window]):>10.4f}" for r in results))
    print(f"\n{'optimizer':<10} {'val loss':>9} {'state bytes':>12} {'bytes/param':>12} {'seconds':>8}")
    for r in results:
        print(f"{r.name:<10} {r.val_loss:>9.4f} {r.state_bytes:>12,} {r.state_bytes / r.num_params:>12.3f} "
              f"{r.seconds:>8.1f}")
    return results


if __name__ == "__main__":
    main()
