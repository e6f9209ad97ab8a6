"""Export to dense AdamW: the moments MicroAdam's window implies, as ``torch.optim.AdamW`` state."""

from __future__ import annotations

from pathlib import Path

import torch

from ..functional import StepConfig, dense_moments
from .atomic import atomic_directory
from .base import Checkpoint, progress_bar


def export_adam(ckpt: Checkpoint, out, *, overwrite: bool = False, progress: bool = True) -> Path:
    """Dense AdamW state rebuilt from the window, as a ``torch.save`` file (a directory with
    ``adamw_state.pt`` and ``README.txt``).

    For each parameter after t steps: exp_avg = (1 - b1) M, exp_avg_sq = (1 - b2) S, step = t, where
    M = sum_i b1^age_i v_i and S = sum_i b2^age_i v_i^2 over the window (ages 0..m-1): AdamW's
    next update m / (1 - b1^t) / (sqrt(v / (1 - b2^t)) + eps) then equals MicroAdam's
    c1 M / (sqrt(c2 S) + eps) with c1 = (1 - b1) / (1 - b1^t), c2 = (1 - b2) / (1 - b2^t). The
    history older than the window (m steps) is absent, as it is in MicroAdam.
    """
    state, names = {}, list(ckpt.params)
    for i, name in enumerate(progress_bar(names, len(names), "export-adam", progress)):
        st = ckpt.checked_state(name)
        if st is None:
            continue
        group = ckpt.groups[ckpt.params[name].group]
        layout, t = ckpt.layout(name), int(st["step"])
        geom = layout.geometry
        b1, b2 = group["betas"]
        flat = layout.from_rows(st)
        cfg = StepConfig.from_group(group, step=t)
        M, S = dense_moments(geom, flat, cfg) if t > 0 else (torch.zeros(geom.numel), torch.zeros(geom.numel))
        shape = ckpt.params[name].shape
        state[i] = {
            "step": torch.tensor(float(t)),
            "exp_avg": (M * (1 - b1)).view(shape),
            "exp_avg_sq": (S * (1 - b2)).view(shape),
        }
    groups = []
    for g, group in enumerate(ckpt.groups):
        groups.append(
            {
                "lr": group["lr"],
                "betas": tuple(group["betas"]),
                "eps": group["eps"],
                "weight_decay": group["weight_decay"],
                "amsgrad": False,
                "maximize": False,
                "foreach": None,
                "capturable": False,
                "differentiable": False,
                "fused": None,
                "params": [i for i, n in enumerate(names) if ckpt.params[n].group == g],
                "param_names": [n for n in names if ckpt.params[n].group == g],
            }
        )
    with atomic_directory(out, overwrite) as tmp:
        torch.save({"state": state, "param_groups": groups}, tmp / "adamw_state.pt")
        (tmp / "README.txt").write_text(
            "torch.optim.AdamW state rebuilt from MicroAdam's window (microadam-ckpt export-adam).\n"
            f"Source: {ckpt.path} ({ckpt.kind}), step {ckpt.step}.\n"
            "exp_avg = (1 - beta1) * M, exp_avg_sq = (1 - beta2) * S, step = t, with M and S the window sums.\n"
            "Parameters are numbered in the order of param_names; build AdamW over model parameters in that\n"
            "order (one group per entry) and call load_state_dict. DeepSpeed's Adam takes the same moments.\n"
        )
    return Path(out)
