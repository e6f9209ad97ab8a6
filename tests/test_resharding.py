"""Spec property P2: a checkpoint saved at N ranks of one engine reloads at M ranks of another.

Sources after 5 steps: DeepSpeed ZeRO-2 at 2 ranks, ZeRO-3 at 3, FSDP2 at 2 (DCP), one process
(canonical). Each is read by the tool into the canonical form, which must equal one process's
state bitwise; each move (N -> M within and across engines, N, M in 1..4) then runs 5 more steps
that must equal the never-moved single-process run bitwise (weights and state). The injected
gradients are reduced exactly by every engine (tests/ds_workers.py), so bitwise is the bar.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import p2_workers as P  # noqa: E402
from dist_utils import run_workers  # noqa: E402

from microadam_dist import MicroAdam, checkpoint  # noqa: E402
from microadam_dist.checkpoint.local import _LiveCheckpoint  # noqa: E402
from microadam_dist.state import FIELDS  # noqa: E402


def cli(*args) -> subprocess.CompletedProcess:
    run = subprocess.run(
        [sys.executable, "-m", "microadam_dist.cli", *map(str, args)], capture_output=True, text=True, timeout=240
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def assert_equal_to(ckpt_like, ref: checkpoint.Checkpoint, what: str) -> None:
    """``ckpt_like``: a Checkpoint, or {"params": {name: w}, "state": {name: row-form state}}."""
    if isinstance(ckpt_like, checkpoint.Checkpoint):
        assert set(ckpt_like.params) == set(ref.params), what
        weights = {n: ckpt_like.weight(n) for n in ref.params}
        states = {n: ckpt_like.state(n) for n in ref.params}
    else:
        weights, states = ckpt_like["params"], ckpt_like["state"]
    for name in ref.params:
        want_w, want_s = ref.weight(name), ref.state(name)
        assert torch.equal(weights[name].reshape(-1).float(), want_w.reshape(-1)), (what, name, "weight")
        for key in FIELDS:
            got = states[name][key]
            assert got.dtype == want_s[key].dtype and torch.equal(got, want_s[key]), (what, name, key)


@pytest.fixture(scope="module")
def refs():
    return {steps: P.reference(steps)[2] for steps in (P.SAVE_AT, P.TOTAL)}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("p2")
    out = {"ds2": root / "ds2", "ds3": root / "ds3", "fsdp2": root / "fsdp2", "single": root / "single"}
    run_workers(P.ds_source, 2, 2, str(out["ds2"]))
    run_workers(P.ds_source, 3, 3, str(out["ds3"]))
    run_workers(P.fsdp_source, 2, str(out["fsdp2"]))
    model, opt, _ = P.reference(P.SAVE_AT)
    checkpoint.save(model, opt, out["single"])
    return out


@pytest.mark.timeout(600)
def test_every_source_reads_as_the_single_process_state(sources, refs, tmp_path):
    kinds = {"ds2": ("deepspeed", 2), "ds3": ("deepspeed", 3), "fsdp2": ("dcp", None), "single": ("canonical", 1)}
    for label, path in sources.items():
        ckpt = checkpoint.open_checkpoint(path)
        assert (ckpt.kind, ckpt.world_size) == kinds[label], label
        assert ckpt.step == P.SAVE_AT, label
        assert_equal_to(ckpt, refs[P.SAVE_AT], label)
        # and through the tool's files: canonical, then DCP, read back bitwise
        cli("convert", path, tmp_path / f"{label}_c", "--to", "single", "--quiet", "--shard-size", "1KiB")
        assert len(list((tmp_path / f"{label}_c").glob("state-*.safetensors"))) > 1  # several shards
        assert_equal_to(checkpoint.open_checkpoint(tmp_path / f"{label}_c"), refs[P.SAVE_AT], label + " canonical")
        cli("convert", tmp_path / f"{label}_c", tmp_path / f"{label}_d", "--to", "dcp", "--quiet")
        assert_equal_to(checkpoint.open_checkpoint(tmp_path / f"{label}_d"), refs[P.SAVE_AT], label + " dcp")
        assert "integrity: ok" in cli("inspect", tmp_path / f"{label}_c", "--verify").stdout


# (source, how it reaches the target, ZeRO stage, world size M)
DEEPSPEED_MOVES = [
    ("ds2", "reshard", 3, 3),  # ZeRO-2 at 2 -> ZeRO-3 at 3, through `microadam-ckpt reshard`
    ("ds3", "native", 1, 2),  # ZeRO-3 at 3 -> ZeRO-1 at 2, DeepSpeed's own files read directly
    ("fsdp2", "native", 2, 1),  # FSDP2 at 2 (DCP) -> ZeRO-2 at 1
    ("single", "native", 2, 4),  # one process (canonical) -> ZeRO-2 at 4
]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("source, how, stage, world", DEEPSPEED_MOVES)
def test_deepspeed_resumes_at_another_world_size(sources, refs, tmp_path, source, how, stage, world):
    src = sources[source]
    if how == "reshard":
        cli("reshard", src, tmp_path / "resharded", "--world-size", world, "--quiet")
        src = tmp_path / "resharded"
    run_workers(P.ds_target, world, stage, str(src), str(tmp_path / "result.pt"))
    result = torch.load(tmp_path / "result.pt", weights_only=False)
    assert_equal_to(result["loaded"], refs[P.SAVE_AT], "after load")
    assert_equal_to(result["module"], refs[P.SAVE_AT], "module weights after load")
    assert_equal_to(result["final"], refs[P.TOTAL], "5 steps after load")


@pytest.mark.timeout(600)
@pytest.mark.parametrize("to", ["single", "dcp"])
def test_the_lr_schedule_survives_a_conversion(tmp_path, to):
    """DeepSpeed's WarmupLR, mid warm-up, saved at ZeRO-2 on 2 ranks, converted by the tool
    (canonical: the manifest records the schedule; DCP: its train_meta.json), resumed at ZeRO-1 on
    1 rank: the same learning rates and, bitwise, the same run as the uninterrupted one."""
    run_workers(P.ds_scheduled_source, 2, 2, str(tmp_path))
    cli("convert", tmp_path / "ds", tmp_path / "converted", "--to", to, "--quiet")
    assert checkpoint.open_checkpoint(tmp_path / "converted").lr_scheduler["last_batch_iteration"] == P.SAVE_AT - 1
    run_workers(P.ds_scheduled_target, 1, 1, str(tmp_path / "converted"), str(tmp_path / "resumed.pt"))
    straight = torch.load(tmp_path / "straight.pt", weights_only=False)
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=False)
    assert resumed["scheduler"] == straight["scheduler"]
    assert resumed["lrs"] == straight["lrs"] and len(set(straight["lrs"])) > 1  # still warming up
    for name, weight in straight["final"]["params"].items():
        assert torch.equal(resumed["final"]["params"][name], weight), (to, name)
        for key in FIELDS:
            assert torch.equal(resumed["final"]["state"][name][key], straight["final"]["state"][name][key]), (to, key)


@pytest.mark.timeout(600)
def test_fsdp2_resumes_from_deepspeed_through_the_tool(sources, refs, tmp_path):
    cli("convert", sources["ds3"], tmp_path / "dcp", "--to", "dcp", "--quiet")  # ZeRO-3 at 3 -> DCP
    run_workers(P.fsdp_target, 4, str(tmp_path / "dcp"), str(tmp_path / "after"))  # FSDP2 at 4
    assert_equal_to(checkpoint.open_checkpoint(tmp_path / "after"), refs[P.TOTAL], "FSDP2 at 4, 5 steps after")


@pytest.mark.parametrize("source", ["ds3", "fsdp2"])
def test_one_process_resumes_from_sharded(sources, refs, tmp_path, source):
    model = P.W.Injected()
    opt = MicroAdam(model.parameters(), **P.W.P1_HYPER)
    checkpoint.load(model, opt, sources[source])
    P.train_single(model, opt, P.SAVE_AT, P.TOTAL)
    assert_equal_to(_LiveCheckpoint(model, opt), refs[P.TOTAL], source)


def test_export_adam_reproduces_microadams_last_update(sources, tmp_path):
    """exp_avg = (1 - b1) M and exp_avg_sq = (1 - b2) S with step t make AdamW's bias-corrected
    direction m / (1 - b1^t) / (sqrt(v / (1 - b2^t)) + eps) equal to the update MicroAdam applied at
    step t, c1 M / (sqrt(c2 S) + eps); checked against the parameters of steps t - 1 and t."""
    cli("export-adam", sources["single"], tmp_path / "adam", "--quiet")
    exported = torch.load(tmp_path / "adam" / "adamw_state.pt")
    before, _, _ = P.reference(P.SAVE_AT - 1)
    after, opt, _ = P.reference(P.SAVE_AT)
    names = [n for n, _ in after.named_parameters()]
    assert exported["param_groups"][0]["param_names"] == names
    hp, t = P.W.P1_HYPER, P.SAVE_AT
    (b1, b2), decay = hp["betas"], 1 - hp["lr"] * hp["weight_decay"]
    for i, (p0, p1) in enumerate(zip(before.parameters(), after.parameters())):
        st = exported["state"][i]
        assert int(st["step"]) == t and st["exp_avg"].shape == p1.shape
        direction = (st["exp_avg"] / (1 - b1**t)) / ((st["exp_avg_sq"] / (1 - b2**t)).sqrt() + hp["eps"])
        applied = (p0.detach() * decay - p1.detach()) / hp["lr"]  # nonzero exactly at the window's entries
        window = st["exp_avg_sq"] != 0
        assert window.sum() > 0, names[i]
        torch.testing.assert_close(applied[window], direction[window], rtol=1e-4, atol=2e-4)
        assert applied[~window].abs().max() < 2e-4  # elsewhere only decay (rounding of p * decay)
    # and torch's AdamW accepts it as is
    model = P.W.Injected()
    adamw = torch.optim.AdamW(model.parameters(), lr=hp["lr"], betas=hp["betas"])
    adamw.load_state_dict({"state": exported["state"], "param_groups": exported["param_groups"]})
    assert int(adamw.state[next(iter(model.parameters()))]["step"]) == t
