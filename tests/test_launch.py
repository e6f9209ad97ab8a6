"""Real launchers: two torchrun agents on 127.0.0.1 act as two nodes."""

import os
import subprocess
import sys
from pathlib import Path

from dist_utils import free_port

ROOT = Path(__file__).resolve().parent.parent
TINY = [
    "--steps",
    "3",
    "--width",
    "32",
    "--context",
    "16",
    "--batch-size",
    "4",
    "--layers",
    "1",
    "--optimizers",
    "microadam",
    "--quiet",
]


def test_two_torchrun_agents_as_two_nodes():
    port = str(free_port())
    env = {
        **os.environ,
        "NNODES": "2",
        "NPROC_PER_NODE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": port,
        "PYTHON": sys.executable,
        "OMP_NUM_THREADS": "1",
    }
    agents = [
        subprocess.Popen(
            ["bash", str(ROOT / "launch/torchrun.sh"), *TINY],
            env={**env, "NODE_RANK": str(node)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for node in (0, 1)
    ]
    outputs = []
    try:
        for agent in agents:
            out, _ = agent.communicate(timeout=240)
            outputs.append(out)
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
    for node, (agent, out) in enumerate(zip(agents, outputs)):
        assert agent.returncode == 0, f"node {node}:\n{out}"
    assert "(world size 2, FSDP2)" in outputs[0], outputs[0]
    assert "microadam" in outputs[0]


def test_main_job_end_to_end(tmp_path):
    """The README's main job with tiny settings: 2 ranks, checkpoint, resume at 3, plot."""
    from microadam_dist.demo import main

    out = tmp_path / "demo"
    plot = main(["--steps", "6", "--out", str(out), "--quiet", "--width", "32", "--context", "16", "--layers", "1"])
    assert plot.exists() and plot.stat().st_size > 10_000
    assert (out / "ckpt" / "microadam" / "train_meta.json").exists()
    assert not (out / "ckpt" / "microadam.partial").exists()
    import json

    for name in ("microadam", "adamw"):
        run = json.loads((out / f"losses_{name}.json").read_text())
        assert len(run["losses"]) == 6
        assert [h["world_size"] for h in run["history"]] == [2, 3]
        assert [h["start"] for h in run["history"]] == [0, 3]


def test_resume_at_another_world_size_continues_the_same_run(tmp_path):
    """2 ranks for 4 steps, then 1 rank from the checkpoint: the losses of an uninterrupted run."""
    import json

    from microadam_dist.demo import torchrun

    tiny = ["--steps", "8", "--width", "32", "--context", "16", "--layers", "1", "--quiet", "--optimizers", "microadam"]
    torchrun(2, [*tiny, "--stop-at", "4", "--save", str(tmp_path / "ckpt"), "--out", str(tmp_path / "a")])
    torchrun(1, [*tiny, "--resume", str(tmp_path / "ckpt"), "--out", str(tmp_path / "a")])
    torchrun(1, [*tiny, "--out", str(tmp_path / "b")])
    resumed = json.loads((tmp_path / "a" / "losses_microadam.json").read_text())["losses"]
    straight = json.loads((tmp_path / "b" / "losses_microadam.json").read_text())["losses"]
    assert len(resumed) == 8
    # fp32 reduction order differs between 2 ranks and 1: agreement to ~1e-6 relative
    assert all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(resumed, straight)), (resumed, straight)


def test_main_job_with_deepspeed_resumes_at_another_world_size(tmp_path):
    """The main job under DeepSpeed ZeRO-2: 2 ranks, checkpoint halfway, resume at 3 ranks (MicroAdam
    through deepspeed_zero.load_checkpoint, the AdamW baseline through DeepSpeed's fragment API),
    plot; both loss curves equal a straight run at 2 ranks."""
    import json

    from microadam_dist.demo import main, torchrun

    tiny = ["--steps", "6", "--quiet", "--width", "32", "--context", "16", "--layers", "1", "--engine", "deepspeed"]
    plot = main([*tiny, "--out", str(tmp_path / "demo")])
    assert plot.exists() and plot.stat().st_size > 10_000
    assert (tmp_path / "demo" / "ckpt" / "microadam" / "ckpt").is_dir()  # DeepSpeed's own layout
    torchrun(2, [*tiny, "--out", str(tmp_path / "straight")])
    for name in ("microadam", "adamw"):
        resumed = json.loads((tmp_path / "demo" / f"losses_{name}.json").read_text())
        straight = json.loads((tmp_path / "straight" / f"losses_{name}.json").read_text())
        assert [h["world_size"] for h in resumed["history"]] == [2, 3] and resumed["engine"] == "deepspeed"
        # 2 and 3 ranks sum the gradients in another order: fp32 ulps
        assert all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(resumed["losses"], straight["losses"])), name
        assert len(resumed["losses"]) == 6


def test_mpirun_discovers_ranks_through_mpi4py():
    """mpirun -np 2 (the `mpi` extra's Open MPI): ranks from mpi4py, training over gloo."""
    import shutil

    mpirun = Path(sys.executable).with_name("mpirun")
    if not mpirun.exists():
        mpirun = shutil.which("mpirun")
    assert mpirun, "mpirun not found: install the project with its `mpi` extra"
    env = {
        **os.environ,
        "NP": "2",
        "MPIRUN": str(mpirun),
        "PYTHON": sys.executable,
        "MASTER_ADDR": "127.0.0.1",
        "OMP_NUM_THREADS": "1",
    }
    out = subprocess.run(
        ["bash", str(ROOT / "launch/mpirun.sh"), *TINY], env=env, capture_output=True, text=True, timeout=240
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "(world size 2, FSDP2)" in out.stdout, out.stdout


def test_main_job_config_file(tmp_path):
    from microadam_dist.train import parse_args

    args = parse_args(["--config", str(ROOT / "configs/main_job.json"), "--steps", "7"])
    assert args.steps == 7 and args.width == 128  # the command line wins over the file
    bad = tmp_path / "bad.json"
    bad.write_text('{"stpes": 5}')
    import pytest

    with pytest.raises(SystemExit, match="unknown keys"):
        parse_args(["--config", str(bad)])
