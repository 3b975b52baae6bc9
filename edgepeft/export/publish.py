"""Step 7 of an export: publish the artifact atomically.

The artifact is written to a temporary sibling directory ``.OUT.tmp-XXXXXXXX`` (with a lock file
``.OUT.tmp-XXXXXXXX.lock`` held while the export runs), synced to disk and renamed into place at the
end, so OUT is either absent or complete, even when the process is killed; on any error the
temporary directory is removed. What a killed export leaves behind (its lock is released by the
kernel) is removed by the next export to the same OUT (:func:`remove_dead_temps`).
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from edgepeft.contract.names import sync_dir

try:
    import fcntl
except ImportError:  # not POSIX: temporary dirs of killed exports stay (clearly named)
    fcntl = None


def remove_dead_temps(out: Path) -> None:
    """Remove what killed exports to ``out`` left: temp dirs whose lock nobody holds."""
    parent = out.resolve().parent
    if fcntl is None or not parent.is_dir():
        return
    for lock in parent.glob(f".{glob.escape(out.name)}.tmp-*.lock"):
        try:
            fd = os.open(lock, os.O_RDWR)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue  # a live export
        try:
            tmp = str(lock)[:-len(".lock")]
            for stale in (Path(tmp), Path(f"{tmp}.old")):
                shutil.rmtree(stale, ignore_errors=True)
            lock.unlink(missing_ok=True)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_dir(out: Path) -> Iterator[Path]:
    """A new locked temporary directory beside ``out`` to write the artifact into; when the block
    ends without an error it is synced and renamed to ``out`` (replacing an existing ``out`` only
    then), on any error (or interrupt) it is removed."""
    parent = out.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp, lock = _claim_temp(parent, out.name)
    try:
        yield tmp
        _sync_tree(tmp)
        _rename(tmp, out)
        sync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        _release_temp(lock)


def _rename(tmp: Path, out: Path) -> None:
    """Move the complete ``tmp`` to ``out``; an existing ``out`` (--force) is swapped out only now."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = Path(f"{tmp}.old")  # covered by the same lock if this process dies here
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _claim_temp(parent: Path, name: str) -> tuple[Path, tuple[int, Path]]:
    """A new empty directory ``parent/.NAME.tmp-XXXXXXXX`` and its lock file, locked (flock) by
    this process: the kernel releases the lock when the process dies, however it dies."""
    while True:
        fd, lock = tempfile.mkstemp(prefix=f".{name}.tmp-", suffix=".lock", dir=parent)
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.fstat(fd).st_nlink == 0:  # a cleaner took it before the lock: draw another
                os.close(fd)
                continue
        tmp = Path(lock[:-len(".lock")])
        try:
            tmp.mkdir()
        except FileExistsError:
            os.close(fd)
            os.unlink(lock)
            continue
        return tmp, (fd, Path(lock))


def _release_temp(lock: tuple[int, Path]) -> None:
    fd, path = lock
    path.unlink(missing_ok=True)
    os.close(fd)


def _sync_tree(root: Path) -> None:
    """fsync every file and directory under ``root``, so the rename publishes complete files even
    if the machine goes down right after."""
    for dirpath, _, files in os.walk(root):
        for f in files:
            with open(os.path.join(dirpath, f), "rb") as fh:
                os.fsync(fh.fileno())
        sync_dir(Path(dirpath))

