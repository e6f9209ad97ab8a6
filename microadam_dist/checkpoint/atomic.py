"""Atomic checkpoint writes: build a directory beside the target, then swap it into place.

There is never a moment without one complete checkpoint: a new directory replaces the old one
in a single atomic exchange (Linux ``renameat2(RENAME_EXCHANGE)``), or, where the filesystem
cannot exchange, the old one is first renamed to ``previous_of(out)`` (``OUT.old``), where
readers look when a crash left ``out`` missing (:func:`last_complete`, ``open_checkpoint``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

from .base import CheckpointError

_USE_EXCHANGE = True  # False: always the OUT.old fallback (filesystems without RENAME_EXCHANGE; tests)
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def write_synced(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` and fsync it (a manifest or seal is only written once its data is)."""
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directory entries in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where
    the platform or the filesystem cannot."""
    import ctypes
    import errno

    if not _USE_EXCHANGE:
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(b))


def previous_of(out: Path) -> Path:
    """Where an overwrite keeps the previous checkpoint while it swaps the new one in (the fallback
    when the two cannot be exchanged atomically); open_checkpoint reads it if ``out`` is missing."""
    out = Path(out)
    return out.with_name(out.name + ".old")


def last_complete(out: Path, marker: str) -> Path | None:
    """The last complete checkpoint at ``out``: ``out`` itself, or ``previous_of(out)`` when a swap
    was interrupted, whichever holds the file ``marker`` (written last); None if neither does."""
    for candidate in (Path(out), previous_of(out)):
        if (candidate / marker).exists():
            return candidate
    return None


def swap_into_place(tmp: Path, out: Path) -> None:
    """Rename the complete directory ``tmp`` to ``out``, replacing a previous ``out`` atomically
    (exchanged, then removed), or through ``previous_of(out)`` where no exchange is possible.

    ``tmp`` must be on ``out``'s filesystem (beside it). A crash at any point leaves a complete
    checkpoint at ``out`` or, for an instant, at ``previous_of(out)``.
    """
    tmp, out = Path(tmp), Path(out)
    old = previous_of(out)
    if not out.exists():
        os.rename(tmp, out)
    elif _exchange(tmp, out):  # out is the new checkpoint, tmp the previous one
        shutil.rmtree(tmp)
    else:
        if old.exists():  # left by a crash after the swap: out is complete, old is stale
            shutil.rmtree(old)
        os.rename(out, old)
        os.rename(tmp, out)
    if old.exists():
        shutil.rmtree(old)


@contextlib.contextmanager
def atomic_directory(out, overwrite: bool = False) -> Iterator[Path]:
    """A temporary directory beside ``out``, renamed to ``out`` when the block completes.

    On an error the temporary directory is removed and ``out`` is untouched; an existing ``out``
    is refused unless ``overwrite``. An overwrite never leaves a moment without a complete
    checkpoint (:func:`swap_into_place`).
    """
    out = Path(out)
    if (out.exists() or previous_of(out).exists()) and not overwrite:
        raise CheckpointError(f"{out} exists; choose another output or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{os.getpid()}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        swap_into_place(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
