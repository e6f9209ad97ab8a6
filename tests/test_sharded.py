"""Sharded steps (ZeRO-style flat partitions, per-parameter chunks) equal the single-process step."""

import math

import pytest
import torch
from dist_utils import run_workers

from microadam_dist import geometry_for
from microadam_dist.functional import StepConfig, microadam_blocks_
from microadam_dist.sharded import Segment, ShardedStepper
from microadam_dist.state import StateLayout

SHAPES = [(9, 150), (700,), (4, 3, 30), (), (5,), (2, 64)]
GROUP = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, window_size=3)
GEO = (64, 16, 0.05)  # block, bucket, density
STEPS = 6


def _data(dtype):
    gen = torch.Generator().manual_seed(7)
    params = [torch.randn(s, generator=gen).to(dtype).reshape(-1) for s in SHAPES]
    grads = [[torch.randn(s, generator=gen).to(dtype).reshape(-1) for s in SHAPES] for _ in range(STEPS)]
    return params, grads


def _single(dtype, alpha=0.0):
    params, grads = _data(dtype)
    states = []
    for i, s in enumerate(SHAPES):
        geom = geometry_for(s, *GEO)
        st = StateLayout(geom, 3).zeros("cpu")
        for t in range(1, STEPS + 1):
            cfg = StepConfig(
                lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, window_size=3, step=t, alpha=alpha
            )
            microadam_blocks_(geom, 0, geom.num_blocks, params[i], grads[t - 1][i], st, cfg)
        st["step"] = torch.tensor(STEPS)
        states.append(st)
    return params, states


def _layout(kind, world, rank):
    """[(param index, start, end)] this rank holds."""
    sizes = [math.prod(s) for s in SHAPES]
    if kind == "zero":  # one flat buffer, padded and cut into equal partitions (ZeRO-1/2)
        total = sum(sizes)
        part = -(-total // world)
        lo, hi = rank * part, (rank + 1) * part
        out, off = [], 0
        for i, n in enumerate(sizes):
            s, e = max(lo, off), min(hi, off + n)
            if s < e:
                out.append((i, s - off, e - off))
            off += n
        return out
    # every parameter cut into world pieces (ZeRO-3, FSDP2 of 1-D parameters)
    out = []
    for i, n in enumerate(sizes):
        part = -(-n // world)
        s, e = min(n, rank * part), min(n, (rank + 1) * part)
        out.append((i, s, e))  # empty pieces included: ranks past the end hold nothing
    return out


def _worker(rank, world, kind, dtype, out_dir, alpha=0.0):
    params, grads = _data(dtype)
    layout = _layout(kind, world, rank)
    local = [params[i][s:e].clone() for i, s, e in layout]
    stepper, states = ShardedStepper(), {}
    for t in range(STEPS):
        segs = [
            Segment(
                key=f"p{i}",
                geometry=geometry_for(SHAPES[i], *GEO),
                start=s,
                param=local[j],
                grad=grads[t][i][s:e].clone(),
                group={**GROUP, "alpha": alpha},
            )
            for j, (i, s, e) in enumerate(layout)
        ]
        stepper.step(segs, states, chunk_elements=1 << 20)
    torch.save({"layout": layout, "params": local, "states": states}, f"{out_dir}/rank{rank}.pt")


@pytest.mark.parametrize("kind, world", [("zero", 2), ("zero", 3), ("chunks", 2), ("chunks", 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sharded_step_is_bitwise_single_process(tmp_path, kind, world, dtype):
    _check_sharded(tmp_path, kind, world, dtype, 0.0)


@pytest.mark.parametrize("kind, world, dtype", [("zero", 3, torch.float32), ("chunks", 2, torch.bfloat16)])
def test_sharded_step_with_densification_is_bitwise_single_process(tmp_path, kind, world, dtype):
    _check_sharded(tmp_path, kind, world, dtype, 0.5)  # the dense pass runs on straddling blocks too


def _check_sharded(tmp_path, kind, world, dtype, alpha):
    run_workers(_worker, world, kind, dtype, str(tmp_path), alpha)
    want_params, want_states = _single(dtype, alpha)
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for i, shape in enumerate(SHAPES):
        pieces = sorted((s, r, j) for r, g in enumerate(got) for j, (pi, s, e) in enumerate(g["layout"]) if pi == i)
        full = torch.cat([got[r]["params"][j] for _, r, j in pieces])
        assert torch.equal(full, want_params[i]), (shape, kind, world)
        for key in ("window_idx", "window_val", "ef_codes", "ef_stats"):
            dim = 1 if key.startswith("window") else 0
            merged = torch.cat([got[r]["states"][f"p{i}"][key] for _, r, _ in pieces], dim=dim)
            assert torch.equal(merged, want_states[i][key]), (shape, key)
        assert all(int(got[r]["states"][f"p{i}"]["step"]) == STEPS for _, r, _ in pieces)


def test_fused_step_chunks_cover_every_key_once_within_the_budget():
    """A fused step's undo records live for one chunk of keys; every rank computes the same chunks."""
    from microadam_dist.sharded import UNDO_CHUNK_ELEMENTS, _key_chunks

    keys = list("abcdef")
    numel = dict(a=10, b=UNDO_CHUNK_ELEMENTS * 3, c=5, d=UNDO_CHUNK_ELEMENTS, e=1, f=1)
    chunks = _key_chunks(keys, numel, 2)
    assert [keys[lo:hi] for lo, hi in chunks] == [["a"], ["b"], ["c", "d", "e", "f"]]
    assert _key_chunks(keys, numel, 1) == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 6)]
    assert _key_chunks([], {}, 3) == []
