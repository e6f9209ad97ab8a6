"""microadam-ckpt and microadam_dist.checkpoint: bad input, atomic output, bounded memory.

Every error path of the tool gets a real damaged or foreign input on disk and must stop with a
message naming the problem, leaving no output behind; the good paths are in test_resharding.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import p2_workers as P  # noqa: E402
from dist_utils import run_workers  # noqa: E402

from microadam_dist import MicroAdam, checkpoint  # noqa: E402
from microadam_dist.checkpoint import CheckpointError  # noqa: E402
from microadam_dist.state import FIELDS  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from bench_checkpoint import make_synthetic, run_measured  # noqa: E402


def cli(*args, expect: int = 0) -> subprocess.CompletedProcess:
    run = subprocess.run(
        [sys.executable, "-m", "microadam_dist.cli", *map(str, args)], capture_output=True, text=True, timeout=240
    )
    assert run.returncode == expect, (run.returncode, run.stdout[-2000:], run.stderr[-2000:])
    return run


def trained(steps=3, **overrides):
    model = P.W.Injected()
    opt = MicroAdam(model.parameters(), **{**P.W.P1_HYPER, **overrides})
    P.train_single(model, opt, 0, steps)
    return model, opt


@pytest.fixture()
def good(tmp_path) -> Path:
    model, opt = trained()
    return checkpoint.save(model, opt, tmp_path / "good")


def leftovers(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name.endswith((".partial", ".old"))]


def test_help_shows_examples():
    out = cli("--help").stdout
    assert "Examples:" in out and "microadam-ckpt convert" in out and "export-adam" in out
    assert "--world-size" in cli("reshard", "--help").stdout


def test_foreign_and_missing_inputs(tmp_path):
    cli("inspect", tmp_path / "nowhere", expect=3)
    (tmp_path / "empty").mkdir()
    assert "not a checkpoint this tool knows" in cli("inspect", tmp_path / "empty", expect=3).stderr
    (tmp_path / "file.pt").write_bytes(b"x")
    assert "is a file" in cli("inspect", tmp_path / "file.pt", expect=3).stderr


def test_truncated_corrupted_and_incomplete_canonical(good, tmp_path):
    state_file = next(good.glob("state-*.safetensors"))
    data = state_file.read_bytes()
    # a flipped byte inside the data: same size, caught by the hash (inspect --verify exits 1)
    state_file.write_bytes(data[:-10] + bytes([data[-10] ^ 0xFF]) + data[-9:])
    run = cli("inspect", good, "--verify", expect=3)
    assert "SHA-256 differs" in run.stdout and "integrity: FAILED" in run.stdout
    # truncated: caught on open, before any tensor is read
    state_file.write_bytes(data[: len(data) // 2])
    assert "truncated" in cli("inspect", good, expect=3).stderr
    with pytest.raises(CheckpointError, match="truncated"):
        checkpoint.open_checkpoint(good)
    # a garbage header of the right size
    state_file.write_bytes(b"\xff" * len(data))
    with pytest.raises(CheckpointError, match="cannot be read as safetensors"):
        checkpoint.open_checkpoint(good).state("ps.0")
    # no manifest: an interrupted write (the manifest is written last)
    (good / checkpoint.MANIFEST).unlink()
    assert "incomplete" in cli("inspect", good, expect=3).stderr


def test_manifest_of_another_version_or_format(good):
    manifest = json.loads((good / checkpoint.MANIFEST).read_text())
    (good / checkpoint.MANIFEST).write_text(json.dumps({**manifest, "version": 99}))
    assert "not supported" in cli("inspect", good, expect=3).stderr
    (good / checkpoint.MANIFEST).write_text(json.dumps({**manifest, "format": "something-else"}))
    assert "not a MicroAdam canonical manifest" in cli("inspect", good, expect=3).stderr
    (good / checkpoint.MANIFEST).write_text("{ not json")
    assert "not valid JSON" in cli("inspect", good, expect=3).stderr


def test_corrupted_state_is_refused_and_nothing_is_written(tmp_path):
    model, opt = trained()
    p = next(iter(model.parameters()))
    opt.state[p]["window_idx"][0, 0] = 32000  # outside every block
    with pytest.raises(CheckpointError, match="outside their blocks"):
        checkpoint.save(model, opt, tmp_path / "bad")
    assert not (tmp_path / "bad").exists() and leftovers(tmp_path) == []
    opt.state[p]["window_idx"][0, 0] = 0
    opt.state[p]["ef_stats"][0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="non-finite"):
        checkpoint.save(model, opt, tmp_path / "bad")


def test_output_is_atomic_and_never_replaced_silently(good, tmp_path):
    out = tmp_path / "out"
    cli("convert", good, out, "--to", "single", "--quiet")
    before = sorted(p.name for p in out.iterdir())
    assert "exists" in cli("convert", good, out, "--to", "single", "--quiet", expect=3).stderr
    # a conversion that fails half way (a damaged source) leaves the previous output as it was
    state_file = next(good.glob("state-*.safetensors"))
    data = state_file.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    begin, end = header["ps.3/window_idx"]["data_offsets"]
    start = 8 + header_len + begin
    state_file.write_bytes(data[:start] + b"\x7f\x7f" * ((end - begin) // 2) + data[start + end - begin :])
    run = cli("convert", good, out, "--to", "single", "--quiet", "--overwrite", expect=3)
    assert "outside their blocks" in run.stderr
    assert sorted(p.name for p in out.iterdir()) == before and leftovers(tmp_path) == []
    state_file.write_bytes(data)
    cli("convert", good, out, "--to", "dcp", "--quiet", "--overwrite")
    assert (out / ".metadata").exists() and leftovers(tmp_path) == []


def test_partial_directory_is_reported_incomplete(good, tmp_path):
    partial = tmp_path / ".ckpt.1234.partial"
    good.rename(partial)
    (partial / checkpoint.MANIFEST).unlink()
    assert "incomplete" in cli("inspect", partial, expect=3).stderr


def test_load_refuses_another_model_and_changes_nothing(good):
    class Other(torch.nn.Module):
        """The checkpoint's model with ps.1 reshaped, ps.5 gone and one parameter more."""

        def __init__(self):
            super().__init__()
            shapes = [s for s in P.W.P1_SHAPES[:-1]]
            shapes[1] = (701,)
            self.ps = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(s)) for s in shapes)
            self.extra = torch.nn.Parameter(torch.zeros(3))

    model = Other()
    opt = MicroAdam(model.parameters(), **P.W.P1_HYPER)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(CheckpointError) as err:
        checkpoint.load(model, opt, good)
    message = str(err.value)
    assert "missing from the checkpoint: ['extra']" in message
    assert "'ps.5'" in message and "ps.1 (700,) -> (701,)" in message
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())) and not opt.state


def test_load_refuses_another_geometry(good):
    model = P.W.Injected()
    opt = MicroAdam(model.parameters(), **{**P.W.P1_HYPER, "window_size": 4})
    with pytest.raises(CheckpointError, match="window_size=3.*window_size=4"):
        checkpoint.load(model, opt, good)


def _adamw_deepspeed(rank, world, out):
    cfg = P.W.ds_config(2, torch.float32, optimizer={"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}})
    engine = P.W._engine(P.W.Injected(), cfg, "json")
    P._ds_train(engine, 0, 1)
    engine.save_checkpoint(out)


def test_checkpoints_of_other_optimizers_and_missing_ranks(tmp_path):
    # DeepSpeed with AdamW, 2 ranks
    run_workers(_adamw_deepspeed, 2, str(tmp_path / "ds_adamw"))
    assert "holds no MicroAdam state" in cli("inspect", tmp_path / "ds_adamw", expect=3).stderr
    # DeepSpeed with MicroAdam, then one rank's file lost
    run_workers(P.ds_source, 2, 2, str(tmp_path / "ds"))
    tag = (tmp_path / "ds" / "latest").read_text().strip()
    next((tmp_path / "ds" / tag).glob("*zero_pp_rank_1_*optim_states.pt")).unlink()
    assert "ranks [1] are missing" in cli("inspect", tmp_path / "ds", expect=3).stderr
    # an AdamW DCP checkpoint of the main job
    from microadam_dist import train

    train.main(
        [
            "--steps",
            "1",
            "--optimizers",
            "adamw",
            "--save",
            str(tmp_path / "dcp"),
            "--quiet",
            "--layers",
            "1",
            "--width",
            "32",
            "--heads",
            "2",
            "--context",
            "16",
        ]
    )
    assert "another optimizer" in cli("inspect", tmp_path / "dcp" / "adamw", expect=3).stderr


def test_damaged_dcp(tmp_path):
    from microadam_dist import train

    train.main(
        [
            "--steps",
            "1",
            "--optimizers",
            "microadam",
            "--save",
            str(tmp_path / "dcp"),
            "--quiet",
            "--layers",
            "1",
            "--width",
            "32",
            "--heads",
            "2",
            "--context",
            "16",
        ]
    )
    ckpt = tmp_path / "dcp" / "microadam"
    assert "integrity: ok" in cli("inspect", ckpt, "--verify").stdout
    data_file = next(ckpt.glob("*.distcp"))
    data_file.unlink()
    assert "is missing" in cli("inspect", ckpt, expect=3).stderr
    (ckpt / ".metadata").write_bytes((ckpt / ".metadata").read_bytes()[:100])
    assert "truncated" in cli("inspect", ckpt, expect=3).stderr  # its size differs from the seal's


@pytest.mark.timeout(300)
def test_conversion_memory_stays_well_below_the_checkpoint(tmp_path):
    """60 parameters of 2^20 elements: ~300 MB on disk, at most ~20 MB of it per parameter. Each
    conversion's peak resident memory beyond the interpreter and its imports (the same command on
    a one-parameter checkpoint of 2^16 elements: the same code paths and imports, measured the same
    way) must stay under a quarter of the checkpoint: it streams one parameter at a time."""
    src = make_synthetic(tmp_path / "src", 60 * 2**20, 2**20, shard_bytes=64 << 20)
    tiny = make_synthetic(tmp_path / "tiny", 2**16, 2**16)
    size = sum(f.stat().st_size for f in src.iterdir())
    assert size > 280e6

    def commands(source, out):
        return (
            ["convert", source, out / "dcp", "--to", "dcp", "--quiet"],
            ["convert", out / "dcp", out / "back", "--to", "single", "--quiet", "--shard-size", "64MiB"],
            ["inspect", out / "back", "--verify"],
        )

    (tmp_path / "big").mkdir()
    (tmp_path / "small").mkdir()
    for args, small in zip(commands(src, tmp_path / "big"), commands(tiny, tmp_path / "small")):
        _, baseline, _ = run_measured([str(a) for a in small])
        _, peak, _ = run_measured([str(a) for a in args])
        assert peak - baseline < size / 4, (args[0], peak - baseline, size)
    tmp_path = tmp_path / "big"
    a, b = checkpoint.open_checkpoint(src), checkpoint.open_checkpoint(tmp_path / "back")
    for name in list(a.params)[::17]:
        assert torch.equal(a.weight(name), b.weight(name))
        assert all(torch.equal(a.state(name)[k], b.state(name)[k]) for k in FIELDS)


@pytest.mark.timeout(300)
def test_killed_conversion_leaves_the_previous_output_and_a_detectable_partial(tmp_path):
    """SIGKILL a conversion half way: the target keeps its previous complete content, the temporary
    directory is reported incomplete by the loader and by inspect, and a new conversion succeeds."""
    import signal
    import time

    src = make_synthetic(tmp_path / "src", 60 * 2**20, 2**20, shard_bytes=16 << 20)
    out = tmp_path / "out"
    cli("convert", src, out, "--to", "single", "--quiet")
    before = {p.name: p.stat().st_size for p in out.iterdir()}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "microadam_dist.cli",
            "convert",
            src,
            out,
            "--to",
            "single",
            "--quiet",
            "--overwrite",
            "--shard-size",
            "16MiB",
        ]
    )
    partial = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        found = [p for p in tmp_path.glob(".out.*.partial") if any(p.glob("state-*.safetensors"))]
        if found:
            partial = found[0]
            break
        time.sleep(0.02)
    assert partial is not None, "the conversion finished before it could be interrupted"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert {p.name: p.stat().st_size for p in out.iterdir()} == before
    assert "integrity: ok" in cli("inspect", out, "--verify").stdout
    assert "incomplete" in cli("inspect", partial, expect=3).stderr
    with pytest.raises(CheckpointError, match="incomplete"):
        checkpoint.open_checkpoint(partial)
    cli("convert", src, out, "--to", "dcp", "--quiet", "--overwrite")
    assert (out / ".metadata").exists()


@pytest.mark.parametrize("density, same", [(0.05, True), (0.15 / 3, True), (0.05 * (1 + 1e-10), False), (0.06, False)])
def test_one_density_rule_for_every_loader(good, density, same):
    """check_compatible (canonical load) and MicroAdam.load_state_dict accept and refuse the same
    densities: 0.15 / 3 is 0.049999999999999996 in binary, the same decimal as 0.05."""
    model, opt = trained()
    sd = opt.state_dict()
    model2 = P.W.Injected()
    opt2 = MicroAdam(model2.parameters(), **{**P.W.P1_HYPER, "density": density})
    outcomes = []
    for load in (lambda: checkpoint.load(model2, opt2, good), lambda: opt2.load_state_dict(sd)):
        try:
            load()
            outcomes.append(True)
        except (CheckpointError, ValueError) as e:
            assert "density" in str(e)
            outcomes.append(False)
    assert outcomes == [same, same]


_KILL_AT_NTH_SWAP_STEP = """
import os, signal, sys
from microadam_dist import checkpoint
from microadam_dist.checkpoint import atomic
src, out, n, exchange = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
atomic._USE_EXCHANGE = exchange
count = 0
def hook(event, args):  # SIGKILL this process just before its n-th rename, exchange or removal
    global count
    if event in ("os.rename", "os.replace", "shutil.rmtree", "ctypes.call_function"):
        count += 1
        if count == n:
            os.kill(os.getpid(), signal.SIGKILL)
ckpt = checkpoint.open_checkpoint(src)
sys.addaudithook(hook)
checkpoint.write_canonical(ckpt, out, overwrite=True, progress=False)
print("finished after", count)
"""


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "old-fallback"])
def test_overwrite_never_leaves_a_moment_without_a_complete_checkpoint(tmp_path, exchange):
    """Kill a writer (a real process, SIGKILL) just before each filesystem step of an overwrite in
    turn: at every point the target opens as a complete checkpoint, the previous one or the new
    one. The old atomic_directory renamed the target away before renaming the new one in, and at
    that moment nothing opened (it fails here at its second rename)."""
    old_model, old_opt = trained(steps=2)
    out = checkpoint.save(old_model, old_opt, tmp_path / "out")
    new = checkpoint.save(*trained(steps=4), tmp_path / "new")
    pristine = tmp_path / "pristine"
    shutil.copytree(out, pristine)
    for n in range(1, 20):
        shutil.rmtree(out, ignore_errors=True)
        for leftover in tmp_path.glob(".out.*"):
            shutil.rmtree(leftover)
        shutil.rmtree(tmp_path / "out.old", ignore_errors=True)
        shutil.copytree(pristine, out)
        run = subprocess.run(
            [sys.executable, "-c", _KILL_AT_NTH_SWAP_STEP, str(new), str(out), str(n), "1" if exchange else "0"],
            capture_output=True,
            text=True,
            timeout=240,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "reading the previous checkpoint" after a kill mid-swap
            got = checkpoint.open_checkpoint(out)
        assert got.step in (2, 4) and got.verify() == [], (n, got.step)
        if run.returncode == 0:
            assert "finished" in run.stdout and got.step == 4
            break
        assert run.returncode == -9, (n, run.returncode, run.stderr[-2000:])
    else:
        raise AssertionError("the overwrite never finished")
    assert n >= 2  # at least one kill point inside the swap was exercised


def _scheduled(lr: float):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(40, 30), torch.nn.Linear(30, 3))
    opt = MicroAdam(model.parameters(), lr=lr, block_size=64, quant_bucket_size=16, density=0.1, window_size=3)
    return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: (step + 1) / 8)


def _steps(model, opt, sched, start: int, stop: int) -> None:
    for t in range(start, stop):
        x = torch.randn(16, 40, generator=torch.Generator().manual_seed(t))
        model(x).square().mean().backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)


def test_one_process_save_and_load_continue_the_lr_schedule(tmp_path):
    """save(..., lr_scheduler=) records the schedule in the manifest; load(..., lr_scheduler=)
    continues it, with the saved lr: the resumed run equals the uninterrupted one bitwise."""
    model, opt, sched = _scheduled(1e-2)
    _steps(model, opt, sched, 0, 3)
    checkpoint.save(model, opt, tmp_path / "ckpt", lr_scheduler=sched)
    _steps(model, opt, sched, 3, 6)
    assert json.loads((tmp_path / "ckpt" / checkpoint.MANIFEST).read_text())["lr_scheduler"]["last_epoch"] == 3
    model2, opt2, sched2 = _scheduled(5.0)  # another lr: the saved one wins, as in Optimizer.load_state_dict
    checkpoint.load(model2, opt2, tmp_path / "ckpt", lr_scheduler=sched2)
    assert opt2.param_groups[0]["lr"] == pytest.approx(1e-2 * 4 / 8)
    _steps(model2, opt2, sched2, 3, 6)
    assert sched2.state_dict() == sched.state_dict()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))
    checkpoint.save(model, opt, tmp_path / "plain")  # no scheduler given: none recorded, and loading says so
    with pytest.warns(RuntimeWarning, match="records no LR scheduler state"):
        checkpoint.load(model2, opt2, tmp_path / "plain", lr_scheduler=sched2)
