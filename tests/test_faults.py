"""Faults during training: a rank killed mid-run, a save killed mid-write (issue: reliability).

The main job saves every few steps (``--save-every``) and, with ``--auto-resume``, a (re)started
worker continues from the last complete checkpoint. torchrun's ``--max-restarts`` restarts the
workers after a rank dies; a job that cannot restart resumes at fewer ranks.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from microadam_dist.distributed import torchrun_command

TINY = [
    "--width",
    "48",
    "--context",
    "32",
    "--layers",
    "2",
    "--heads",
    "2",
    "--quiet",
    "--optimizers",
    "microadam",
    "--batch-size",
    "12",
]


@pytest.fixture
def torchrun():
    """Starts torchrun jobs (``torchrun(nproc, args, restarts=0)``); whatever is still running at
    the end of the test (a job that hung past its timeout) is killed with its workers, by PID."""
    started: list[subprocess.Popen] = []

    def start(nproc: int, args: list[str], restarts: int = 0) -> subprocess.Popen:
        job = subprocess.Popen(
            torchrun_command(nproc, args, restarts=restarts),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        started.append(job)
        return job

    yield start
    for job in started:
        if job.poll() is None:
            with contextlib.suppress(psutil.NoSuchProcess):
                for child in psutil.Process(job.pid).children(recursive=True):
                    with contextlib.suppress(psutil.NoSuchProcess):
                        child.kill()
            job.kill()
            job.wait()


def kill_one_worker_after_first_checkpoint(agent: subprocess.Popen, ckpt: Path) -> int:
    """SIGKILL one of the agent's workers (processes this test started, through the agent) once
    a checkpoint is complete; returns the killed worker's PID."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and agent.poll() is None:
        if (ckpt / "train_meta.json").exists():
            workers = [
                p
                for p in psutil.Process(agent.pid).children(recursive=True)
                if "microadam_dist.train" in " ".join(p.cmdline())
            ]
            if workers:
                victim = workers[-1].pid
                os.kill(victim, signal.SIGKILL)
                return victim
        time.sleep(0.05)
    raise AssertionError("the job ended before a rank could be killed")


def losses(out: Path) -> list[float]:
    return json.loads((out / "losses_microadam.json").read_text())["losses"]


@pytest.mark.timeout(600)
def test_killed_rank_restarts_from_the_last_checkpoint_and_at_fewer_ranks(tmp_path, torchrun):
    steps = ["--steps", "60", "--save-every", "5"]
    straight = torchrun(2, [*TINY, *steps, "--out", str(tmp_path / "straight")])
    assert straight.wait(timeout=300) == 0, straight.stdout.read()

    # 1. torchrun restarts the workers once; they resume from the last checkpoint at the same size
    #    (the restarted group starts in a store namespace of its own: microadam_dist.distributed;
    #    without it, about one restart in four hung in init_process_group)
    ckpt = tmp_path / "ckpt"
    job = torchrun(
        2, [*TINY, *steps, "--save", str(ckpt), "--auto-resume", "--out", str(tmp_path / "restarted")], restarts=1
    )
    kill_one_worker_after_first_checkpoint(job, ckpt / "microadam")
    out, _ = job.communicate(timeout=300)
    assert job.returncode == 0, out
    meta = json.loads((ckpt / "microadam" / "train_meta.json").read_text())
    assert len(meta["history"]) == 2 and meta["history"][1]["start"] > 0, meta["history"]  # really resumed
    got, want = losses(tmp_path / "restarted"), losses(tmp_path / "straight")
    assert len(got) == 60 and all(abs(a - b) <= 1e-6 * abs(b) for a, b in zip(got, want))

    # 2. no restarts left: the job fails, and a new one at 1 rank continues from the checkpoint
    ckpt2 = tmp_path / "ckpt2"
    job = torchrun(2, [*TINY, *steps, "--save", str(ckpt2), "--auto-resume", "--out", str(tmp_path / "shrunk")])
    kill_one_worker_after_first_checkpoint(job, ckpt2 / "microadam")
    out, _ = job.communicate(timeout=300)
    assert job.returncode != 0
    resumed = torchrun(1, [*TINY, *steps, "--save", str(ckpt2), "--auto-resume", "--out", str(tmp_path / "shrunk")])
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    history = json.loads((ckpt2 / "microadam" / "train_meta.json").read_text())["history"]
    assert [h["world_size"] for h in history][-1] == 1 and history[-1]["start"] > 0
    got = losses(tmp_path / "shrunk")
    # 1 rank sums the gradients in another order than 2: fp32 ulps, then top-k near-ties
    assert len(got) == 60 and all(abs(a - b) <= 1e-4 * abs(b) for a, b in zip(got, want))


@pytest.mark.timeout(300)
def test_killed_save_keeps_the_previous_checkpoint(tmp_path, torchrun):
    """SIGKILL the job while it writes a checkpoint: the previous one stays complete and loadable,
    the partial one is refused as incomplete by the job and by the tool."""
    from microadam_dist import checkpoint

    big = [
        "--width",
        "256",
        "--context",
        "64",
        "--layers",
        "4",
        "--heads",
        "4",
        "--quiet",
        "--optimizers",
        "microadam",
        "--batch-size",
        "4",
    ]
    ckpt = tmp_path / "ckpt"
    first = torchrun(1, [*big, "--steps", "2", "--save", str(ckpt)])
    assert first.wait(timeout=200) == 0, first.stdout.read()
    job = torchrun(1, [*big, "--steps", "40", "--save-every", "1", "--save", str(ckpt), "--auto-resume"])
    partial = ckpt / "microadam.partial"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and job.poll() is None and not (partial.exists() and any(partial.iterdir())):
        time.sleep(0.005)
    assert job.poll() is None, "the job ended before its save could be interrupted"
    for worker in psutil.Process(job.pid).children(recursive=True):
        os.kill(worker.pid, signal.SIGKILL)
    os.kill(job.pid, signal.SIGKILL)
    job.wait()
    assert partial.exists()
    complete = checkpoint.open_checkpoint(ckpt / "microadam")  # the last complete one
    assert complete.kind == "dcp" and complete.step >= 2
    with pytest.raises(checkpoint.CheckpointError, match="incomplete"):
        checkpoint.open_checkpoint(partial)
    run = subprocess.run(
        [sys.executable, "-m", "microadam_dist.cli", "inspect", str(partial)], capture_output=True, text=True
    )
    assert run.returncode == 3 and "incomplete" in run.stderr  # the CLI's code for bad input
    # and the job resumes from the complete one
    again = torchrun(1, [*big, "--steps", str(complete.step + 1), "--save", str(ckpt), "--auto-resume"])
    out, _ = again.communicate(timeout=200)
    assert again.returncode == 0, out
    meta = json.loads((ckpt / "microadam" / "train_meta.json").read_text())
    assert meta["step"] == complete.step + 1 and meta["history"][-1]["start"] == complete.step
