"""A damaged checkpoint never passes and never crashes (issue 15, section 5).

Small real checkpoints of every format ``microadam-ckpt`` reads are built once per session:
canonical (``checkpoint.save``), DCP (``checkpoint.write_dcp``: DCP's own ``dcp.save`` with the
package's seal) and DeepSpeed ZeRO-2 at 2 ranks (``train.save_checkpoint`` of a real engine: its
``engine.save_checkpoint`` plus the seal). Hypothesis then damages a copy at random, one change
at a time: a byte xor-ed with a non-zero mask (anywhere, or near a file's start or end, where the
headers, manifests and zip directories are), a truncation to a shorter length, a deleted file,
an emptied non-empty file, appended bytes. Every one changes the bytes on disk, so none is a
no-op. ``inspect --verify`` runs in-process (``cli.main``), and must end with the documented exit
code for bad input (3) and a message naming the checkpoint: never a traceback, never a pass.

Checkpoints without the package's digests (a DCP or DeepSpeed directory written by other code:
the same files with the seal removed, or ``engine.save_checkpoint`` alone) cannot reveal every
change: a flipped byte inside DCP's pickled ``.metadata`` or inside a zip's padding may read back
as valid. For them "never a pass" means: never "integrity: ok" (at best "unverified", exit 0, with
what is not covered named), never a traceback, and deleted, emptied or truncated files are
always errors (exit 3).
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import p2_workers as P  # noqa: E402
from dist_utils import run_workers  # noqa: E402

from microadam_dist import MicroAdam, checkpoint, cli  # noqa: E402

EXIT_BAD = cli.EXIT_BAD_CHECKPOINT
assert EXIT_BAD == 3  # documented in the CLI's help and the README


def profile(examples: int):
    # derandomized: the same examples every run (a failure reproduces), no database
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )


def _ds_save(rank, world, sealed, unsealed):
    """ZeRO-2 at 2 ranks: the main job's save (engine.save_checkpoint, then the seal) and a plain
    engine.save_checkpoint of the same state."""
    from microadam_dist import train

    engine = P._ds_engine(2)
    P._ds_train(engine, 0, 2)
    train.save_checkpoint(Path(sealed), engine, None, {"step": 2, "losses": [], "history": []})
    engine.save_checkpoint(unsealed)


@pytest.fixture(scope="session")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("damage-sources")
    model = P.W.Injected()
    opt = MicroAdam(model.parameters(), **P.W.P1_HYPER)
    P.train_single(model, opt, 0, 2)
    out = {"canonical": checkpoint.save(model, opt, root / "canonical")}
    out["dcp"] = checkpoint.write_dcp(checkpoint.open_checkpoint(out["canonical"]), root / "dcp", progress=False)
    # the same DCP files as another program's dcp.save leaves them: no seal
    shutil.copytree(out["dcp"], root / "dcp-unsealed")
    for name in (checkpoint.DIGESTS, checkpoint.TRAIN_META):
        (root / "dcp-unsealed" / name).unlink()
    out["dcp-unsealed"] = root / "dcp-unsealed"
    run_workers(_ds_save, 2, str(root / "ds"), str(root / "ds-unsealed"))
    out["deepspeed"], out["deepspeed-unsealed"] = root / "ds", root / "ds-unsealed"
    for kind, path in out.items():  # every source is good to begin with
        code, text = run_cli(path)
        assert code == 0 and ("integrity: ok" if "unsealed" not in kind else "integrity: unverified") in text, (
            kind,
            code,
            text,
        )
    return out


def run_cli(path: Path, *extra: str) -> tuple[int, str]:
    """``microadam-ckpt inspect --verify PATH`` in this process: (exit code, stdout + stderr)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            cli.main(["inspect", str(path), "--verify", *extra])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return code, stdout.getvalue() + stderr.getvalue()


# ---- damage -------------------------------------------------------------------------------------
DAMAGE = st.fixed_dictionaries(
    {
        "file": st.integers(0, 10**6),  # index into the checkpoint's files (mod their number)
        "kind": st.sampled_from(["flip", "flip", "flip", "truncate", "delete", "empty", "append"]),
        "where": st.sampled_from(["anywhere", "head", "tail"]),
        "at": st.integers(0, 10**9),
        "mask": st.integers(1, 255),  # xor with a non-zero mask: the byte always changes
        "tail": st.binary(min_size=1, max_size=64),
    }
)


def files_of(path: Path, only_read: bool = False) -> list[Path]:
    """The checkpoint's files (``only_read``: without the scripts DeepSpeed copies beside the
    checkpoint, zero_to_fp32.py and the like, which no reader opens; the seal covers them)."""
    return sorted(f for f in path.rglob("*") if f.is_file() and not (only_read and f.suffix == ".py"))


def damage(path: Path, d: dict, only_read: bool = False) -> str:
    """Apply one change to a file of the checkpoint at ``path``; describe it."""
    files = files_of(path, only_read)
    f = files[d["file"] % len(files)]
    data = f.read_bytes()
    kind = d["kind"]
    if kind in ("flip", "truncate", "empty") and not data:
        kind = "append"  # nothing to change in an empty file; adding bytes still changes it
    if kind == "flip":
        span = {"anywhere": len(data), "head": min(len(data), 512), "tail": min(len(data), 512)}[d["where"]]
        i = d["at"] % span
        i = len(data) - 1 - i if d["where"] == "tail" else i
        f.write_bytes(data[:i] + bytes([data[i] ^ d["mask"]]) + data[i + 1 :])
        return f"{f.name}: byte {i} ^= {d['mask']:#04x}"
    if kind == "truncate":
        n = d["at"] % len(data)  # strictly shorter
        f.write_bytes(data[:n])
        return f"{f.name}: truncated to {n} of {len(data)} bytes"
    if kind == "delete":
        f.unlink()
        return f"{f.name}: deleted"
    if kind == "empty":
        f.write_bytes(b"")
        return f"{f.name}: emptied ({len(data)} bytes)"
    f.write_bytes(data + d["tail"])
    return f"{f.name}: {len(d['tail'])} bytes appended"


def damaged_copy(source: Path, tmp: Path, d: dict, only_read: bool = False) -> tuple[Path, str]:
    target = tmp / "ckpt"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target)
    return target, damage(target, d, only_read)


def assert_named_error(code: int, text: str, path: Path, what: str) -> None:
    assert "Traceback" not in text, (what, text)
    assert code == EXIT_BAD, f"{what}: exit {code}, expected {EXIT_BAD} (bad input)\n{text}"
    assert "integrity: ok" not in text and str(path) in text, (what, text)  # names the damaged checkpoint


# ---- the properties -----------------------------------------------------------------------------
@pytest.mark.parametrize("kind, examples", [("canonical", 150), ("dcp", 60), ("deepspeed", 50)])
def test_damage_to_a_sealed_checkpoint_is_always_a_named_error(sources, tmp_path, kind, examples):
    """Canonical directories (a manifest with its own SHA-256 and every file's) and the DCP and
    DeepSpeed directories this package writes (sealed by microadam-digests.json): every change
    is detected."""

    @profile(examples)
    @given(d=DAMAGE)
    def check(d):
        path, what = damaged_copy(sources[kind], tmp_path, d)
        code, text = run_cli(path)
        assert_named_error(code, text, path, f"{kind}, {what}")

    check()


@pytest.mark.parametrize("kind, examples", [("dcp-unsealed", 50), ("deepspeed-unsealed", 50)])
def test_damage_to_an_unsealed_checkpoint_never_passes_as_verified(sources, tmp_path, kind, examples):
    """DCP and DeepSpeed written by other code: a named error, or at best "unverified" with what
    no digest covers; a lost, emptied or truncated file is always an error."""

    @profile(examples)
    @given(d=DAMAGE)
    def check(d):
        path, what = damaged_copy(sources[kind], tmp_path, d, only_read=True)
        code, text = run_cli(path)
        assert "Traceback" not in text and "integrity: ok" not in text, (what, text)
        if code == 0:
            assert "integrity: unverified" in text and d["kind"] in ("flip", "append"), (what, text)
        else:
            assert_named_error(code, text, path, f"{kind}, {what}")

    check()


# the reported cases, kept as named examples
def test_reported_manifest_damage(sources, tmp_path):
    path = tmp_path / "c"
    for old, new in [
        (b'"betas"', b'"beTas"'),
        (b'"files"', b'"file{"'),
        (b'"shape"', b'"sh`pe"'),
        (b'"dtype"', b'"dtyPe"'),
    ]:
        if path.exists():
            shutil.rmtree(path)
        shutil.copytree(sources["canonical"], path)
        changed = False
        for f in files_of(path):
            data = f.read_bytes()
            if old in data:
                f.write_bytes(data.replace(old, new, 1))
                changed = True
                break
        assert changed, old
        code, text = run_cli(path)
        assert_named_error(code, text, path, f"{old} -> {new}")


def test_version_1_manifest_is_read_and_reported_unverified(sources, tmp_path):
    """A manifest written before the self-digest (version 1): still loads; --verify checks every data
    file's digest and says the manifest itself is unverified (exit 0); its schema still applies."""
    import json

    path = tmp_path / "v1"
    shutil.copytree(sources["canonical"], path)
    manifest = json.loads((path / checkpoint.MANIFEST).read_text())
    del manifest[checkpoint.MANIFEST_DIGEST]
    del manifest["lr_scheduler"]  # version 3's; version 1 had neither
    manifest["version"] = 1
    (path / checkpoint.MANIFEST).write_text(json.dumps(manifest, indent=1))
    code, text = run_cli(path)
    assert code == 0 and "integrity: unverified" in text and "unverified manifest" in text, text
    model = P.W.Injected()
    checkpoint.load(model, MicroAdam(model.parameters(), **P.W.P1_HYPER), path)
    # a damaged key is still named by the schema, and a damaged data file by its digest
    (path / checkpoint.MANIFEST).write_text(json.dumps(manifest, indent=1).replace('"betas"', '"beTas"'))
    code, text = run_cli(path)
    assert_named_error(code, text, path, "v1 beTas")
    assert "has no 'betas'" in text


def test_exit_code_of_a_real_process(sources, tmp_path):
    """The same exit code from the installed entry point's process as from cli.main in-process."""
    for kind, d in [
        ("canonical", {"file": 0, "kind": "flip", "where": "head", "at": 40, "mask": 1, "tail": b"x"}),
        ("dcp", {"file": 0, "kind": "truncate", "where": "anywhere", "at": 7, "mask": 1, "tail": b"x"}),
        ("deepspeed", {"file": 1, "kind": "flip", "where": "anywhere", "at": 999, "mask": 4, "tail": b"x"}),
    ]:
        path, what = damaged_copy(sources[kind], tmp_path, d)
        run = subprocess.run(
            [sys.executable, "-m", "microadam_dist.cli", "inspect", str(path), "--verify"],
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert_named_error(run.returncode, run.stdout + run.stderr, path, f"{kind}, {what}")


def test_resharded_sealed_deepspeed_checkpoint_gets_its_own_seal(sources, tmp_path):
    """`reshard` of a sealed DeepSpeed checkpoint copies the files beside it, but not the source's
    seal (which lists the source's files): the output is sealed anew and verifies as ok."""
    out = tmp_path / "resharded"
    code, text = 0, ""
    try:
        cli.main(["reshard", str(sources["deepspeed"]), str(out), "--world-size", "1", "--quiet"])
    except SystemExit as e:
        code = e.code
    assert code == 0, text
    code, text = run_cli(out)
    assert code == 0 and "integrity: ok" in text, text
