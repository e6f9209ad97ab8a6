"""The main job: a small GPT trained on CPython's bundled documentation, MicroAdam beside AdamW.

    python -m microadam_dist.train                     # one process, both optimizers
    torchrun --nproc-per-node 2 -m microadam_dist.train # FSDP2 (fully_shard) on 2 ranks

Every run sees the same global batches whatever the world size (each rank takes its slice), so
runs at different world sizes are comparable step by step. The job prints the loss curves, the
final validation loss, tokens per second and the exact optimizer-state bytes (per rank).
"""

from __future__ import annotations

import argparse
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

from .data import get_batch, split_corpus
from .models import GPT, GPTConfig
from .optimizer import MicroAdam


@dataclass
class RunResult:
    name: str
    losses: list[float]
    val_loss: float
    state_bytes: int  # on this rank
    state_bytes_total: int  # all ranks together
    num_params: int  # in the whole model
    seconds: float
    tokens_per_second: float


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer state held by this rank (local shards of DTensors)."""
    if isinstance(opt, MicroAdam):
        return opt.state_bytes()
    total = 0
    for st in opt.state.values():
        for t in st.values():
            if isinstance(t, torch.Tensor):
                t = t.to_local() if hasattr(t, "to_local") else t
                total += t.numel() * t.element_size()
    return total


def world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def mean_across_ranks(value: float) -> float:
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def local_slice(x: torch.Tensor) -> torch.Tensor:
    rank, size = world()
    per_rank = x.shape[0] // size
    return x[rank * per_rank:(rank + 1) * per_rank]


def build_model(args, device) -> GPT:
    torch.manual_seed(args.seed)
    model = GPT(GPTConfig(n_layer=args.layers, n_embd=args.width, n_head=args.heads, block_size=args.context))
    model.to(device)
    if dist.is_initialized():
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


@torch.no_grad()
def evaluate(model: GPT, data: torch.Tensor, args, device, batches: int = 8) -> float:
    gen = torch.Generator().manual_seed(1234)
    model.eval()
    losses = []
    for _ in range(batches):
        x, y = get_batch(data, args.batch_size, args.context, gen)
        losses.append(mean_across_ranks(model(local_slice(x).to(device), local_slice(y).to(device)).item()))
    model.train()
    return sum(losses) / len(losses)


def train_one(name: str, args, device) -> RunResult:
    model = build_model(args, device)
    lr = args.lr_microadam if name == "microadam" else args.lr_adamw
    if name == "microadam":
        opt = MicroAdam(model.parameters(), lr=lr, weight_decay=args.weight_decay)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=args.weight_decay)
    train, val = split_corpus()
    gen = torch.Generator().manual_seed(args.seed)
    losses = []
    start = time.perf_counter()
    bar = tqdm(range(args.steps), desc=f"{name:>9}", disable=args.quiet or world()[0] != 0, ncols=100)
    for step in bar:
        # the same schedule for both: linear warm-up, then cosine decay
        frac = min(1.0, (step + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for g in opt.param_groups:
            g["lr"] = lr * frac
        x, y = get_batch(train, args.batch_size, args.context, gen)
        loss = model(local_slice(x).to(device), local_slice(y).to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(mean_across_ranks(loss.item()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    seconds = time.perf_counter() - start
    n = sum(p.numel() for p in model.parameters())
    tokens = args.steps * args.batch_size * args.context
    local_bytes = optimizer_state_bytes(opt)
    total_bytes = round(mean_across_ranks(local_bytes) * world()[1])
    return RunResult(name, losses, evaluate(model, val, args, device), local_bytes, total_bytes, n, seconds,
                     tokens / seconds)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=16, help="global batch (split across ranks)")
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--optimizers", nargs="+", default=["microadam", "adamw"], choices=["microadam", "adamw"])
    ap.add_argument("--lr-microadam", type=float, default=1e-2)
    ap.add_argument("--lr-adamw", type=float, default=3e-3)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    return ap.parse_args(argv)


def main(argv=None) -> list[RunResult]:
    args = parse_args(argv)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    rank, size = world()
    if args.batch_size % size:
        raise SystemExit(f"--batch-size {args.batch_size} must be divisible by the world size {size}")
    try:
        results = [train_one(name, args, device) for name in args.optimizers]
    finally:
        if distributed:
            dist.destroy_process_group()
    if rank == 0:
        report(results, args, size)
    return results


def report(results: list[RunResult], args, size: int) -> None:
    every = max(1, args.steps // 10)
    print(f"\n{'step':>6} " + " ".join(f"{r.name:>10}" for r in results))
    for s in range(every - 1, args.steps, every):
        window = slice(max(0, s - every + 1), s + 1)
        print(f"{s + 1:>6} " + " ".join(f"{sum(r.losses[window]) / len(r.losses[window]):>10.4f}" for r in results))
    print(f"\n{'optimizer':<10} {'val loss':>9} {'state bytes':>12} {'rank 0':>12} {'bytes/param':>12} "
          f"{'tokens/s':>9} {'seconds':>8}   (world size {size})")
    for r in results:
        print(f"{r.name:<10} {r.val_loss:>9.4f} {r.state_bytes_total:>12,} {r.state_bytes:>12,} "
              f"{r.state_bytes_total / r.num_params:>12.3f} {r.tokens_per_second:>9.0f} {r.seconds:>8.1f}")


if __name__ == "__main__":
    main()
