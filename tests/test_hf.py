"""The real HF Trainer and Accelerate with MicroAdam on CPU (gloo, 2 ranks), a tiny GPT-2 from a config.

* Trainer + DeepSpeed ZeRO-2 from the shipped configs/hf_ds_zero2.json ("auto" values): saved at 2
  ranks, resumed with resume_from_checkpoint at 1 rank (engine.load_checkpoint reshards), and from
  `microadam-ckpt reshard --world-size 1` output (DeepSpeed's own load);
* Trainer + FSDP2 with FULL_STATE_DICT (the default): saved at 2 ranks, resumed at 1;
* torch's FSDP2 full state dicts (with and without cpu_offload), loaded back.

Each resume is compared with the uninterrupted run: its losses and final weights (Trainer.save_model).
(At the same world size resumes are bitwise: test_deepspeed.py, test_fsdp.py.) At another world
size each rank's loss is its share of the global mean (transformers divides by the tokens of the
whole global batch), so the 1-rank loss is the sum of the 2 ranks'; the gradient is then reduced
in another order (a few fp32 ulps), hence a relative tolerance of 1e-5 (measured: losses 1e-7, weights bitwise equal).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from dist_utils import run_workers  # noqa: E402

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # inherited by the spawned workers
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import hf_workers as H  # noqa: E402

REL = 1e-5


def _losses(out: Path, world: int) -> list[list[dict]]:
    return [torch.load(out / f"losses_rank{r}.pt", weights_only=False) for r in range(world)]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def _assert_weights(got: dict, want: dict, rel: float, what: str) -> None:
    assert sorted(got) == sorted(want), what
    for name, w in want.items():
        if rel == 0:
            assert torch.equal(got[name], w), (what, name)
        else:
            err = float((got[name] - w).abs().max() / w.abs().max())
            assert err <= rel, (what, name, err)


def _assert_losses(got: list[float], want: list[float], rel: float, what: str) -> None:
    assert len(got) == len(want), (what, got, want)
    for a, b in zip(got, want):
        assert abs(a - b) <= rel * abs(b), (what, got, want)


def _uninterrupted(tmp_path: Path, engine: str) -> tuple[list[list[float]], dict]:
    out = tmp_path / "full"
    run_workers(H.trainer_run, 2, engine, str(out), [None])
    runs = _losses(out, 2)
    assert all(r[0]["step"] == H.STEPS for r in runs)
    assert runs[0][0]["losses"] != runs[1][0]["losses"]  # each rank trained on its own share
    return [r[0]["losses"] for r in runs], _weights(out / "0" / "final")


@pytest.mark.timeout(300)
def test_trainer_deepspeed_zero2_resumes_at_another_world_size_and_from_reshard(tmp_path):
    losses, weights = _uninterrupted(tmp_path, "deepspeed")
    saved = tmp_path / "full" / "0" / "run" / f"checkpoint-{H.SAVE_AT}"
    assert (saved / f"global_step{H.SAVE_AT}").is_dir() and (saved / "latest").is_file()
    resharded = tmp_path / "resharded"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "microadam_dist.cli",
            "reshard",
            str(saved),
            str(resharded),
            "--world-size",
            "1",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    tag = resharded / f"global_step{H.SAVE_AT}"
    assert (resharded / "latest").read_text() == tag.name
    assert sorted(f.name for f in tag.iterdir()) == [
        "mp_rank_00_model_states.pt",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
    ]
    for name in ("trainer_state.json", "rng_state_0.pth", "rng_state_1.pth"):  # carried along
        assert (resharded / name).read_bytes() == (saved / name).read_bytes(), name
    assert json.loads((resharded / "trainer_state.json").read_text())["global_step"] == H.SAVE_AT

    out = tmp_path / "at1"
    run_workers(H.trainer_run, 1, "deepspeed", str(out), [str(saved), str(resharded)])
    global_losses = [a + b for a, b in zip(*losses)]  # see the module docstring
    for i, (source, how) in enumerate([("the 2-rank checkpoint", "resharded"), ("reshard's output", "native")]):
        run = _losses(out, 1)[0][i]
        assert run["step"] == H.STEPS and run["load"] == how, (source, run)
        _assert_losses(run["losses"], global_losses[H.SAVE_AT :], REL, f"1 rank from {source}")
        _assert_weights(_weights(out / str(i) / "final"), weights, REL, f"1 rank from {source}")


@pytest.mark.timeout(300)
def test_trainer_fsdp2_full_state_dict_resumes_at_another_world_size(tmp_path):
    losses, weights = _uninterrupted(tmp_path, "fsdp")
    saved = tmp_path / "full" / "0" / "run" / f"checkpoint-{H.SAVE_AT}"
    assert (saved / "optimizer.pt").is_file()  # FULL_STATE_DICT: one file of the full optimizer state
    run_workers(H.trainer_run, 1, "fsdp", str(tmp_path / "at1"), [str(saved)])
    _assert_losses(
        _losses(tmp_path / "at1", 1)[0][0]["losses"], [a + b for a, b in zip(*losses)][H.SAVE_AT :], REL, "1 rank"
    )
    _assert_weights(_weights(tmp_path / "at1" / "0" / "final"), weights, REL, "1 rank")


@pytest.mark.timeout(300)
def test_trainer_ddp_with_a_microadam_instance_resumes_at_another_world_size(tmp_path):
    """The README's DDP recipe, optimizers=(MicroAdam(...), None): the state (its dtypes included)
    goes through the Trainer's optimizer.pt and back, and the schedule through its scheduler.pt."""
    losses, weights = _uninterrupted(tmp_path, "ddp")
    saved = tmp_path / "full" / "0" / "run" / f"checkpoint-{H.SAVE_AT}"
    assert (saved / "optimizer.pt").is_file() and (saved / "scheduler.pt").is_file()
    run_workers(H.trainer_run, 1, "ddp", str(tmp_path / "at1"), [str(saved)])
    _assert_losses(
        _losses(tmp_path / "at1", 1)[0][0]["losses"], [a + b for a, b in zip(*losses)][H.SAVE_AT :], REL, "1 rank"
    )
    _assert_weights(_weights(tmp_path / "at1" / "0" / "final"), weights, REL, "1 rank")


@pytest.mark.timeout(120)
def test_fsdp2_full_state_dict_with_and_without_cpu_offload(tmp_path):
    run_workers(H.torch_full_state_dict, 2, str(tmp_path))
    state = next(iter(torch.load(tmp_path / "full_optim.pt", weights_only=False)["state"].values()))
    assert not any(type(v).__name__ == "DTensor" for v in state.values())  # gathered: plain full tensors
    assert state["window_idx"].dtype == torch.int32  # widened for the collectives (int16 values)
