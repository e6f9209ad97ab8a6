"""Learning-rate tuning shared by bench_convergence.py and bench_finetune.py: the schedule, setting
the rate on an optimizer, and a grid extended at its winning edge until the best rate is inside."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TypeVar

import torch

R = TypeVar("R")


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        if isinstance(g["lr"], torch.Tensor):  # torchao keeps lr as a tensor, updated in place
            g["lr"].fill_(lr)
        else:
            g["lr"] = lr


def lr_factor(step: int, steps: int, warmup: int) -> float:
    # train.py's schedule: linear warm-up, then cosine decay to 0 at the last step
    return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))


def inside(tried: dict[float, R], best: float) -> bool:
    """Whether ``best`` is strictly inside the rates tried (a single rate counts as inside: nothing
    was tuned)."""
    return len(tried) == 1 or min(tried) < best < max(tried)


def extend_grid(
    run: Callable[[float], R], grid: list[float], score: Callable[[R], float], max_extend: int
) -> tuple[dict[float, R], float]:
    """Run every rate of ``grid``; while the best (lowest ``score``) is at an edge, run one more rate
    a factor of 3 beyond that edge, at most ``max_extend`` times. Returns every run by rate (in the
    order run) and the best rate; ``inside(tried, best)`` says whether the grid brackets it."""
    tried = {lr: run(lr) for lr in grid}
    for _ in range(max_extend):
        best = min(tried, key=lambda lr: score(tried[lr]))
        if inside(tried, best):
            break
        new = best / 3 if best == min(tried) else best * 3
        tried[new] = run(new)
    return tried, min(tried, key=lambda lr: score(tried[lr]))
