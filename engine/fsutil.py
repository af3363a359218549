"""Filesystem primitives every wing uses: one inter-process lock, and the temp-directory-then-rename write."""

from __future__ import annotations

import fcntl
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_directory(
    target: str | Path, prefix: str | None = None, *, replace: bool = True, mode: int = 0o755
) -> Iterator[Path]:
    """A temporary directory beside `target` to fill; on success it becomes `target`, on any failure (Ctrl-C
    included) it is removed, so a half-written directory never appears at `target`.

    An existing `target` is moved aside (`.old-<name>-<hex>`) and deleted only once the new one is in place, so a
    process still reading it keeps its files. With `replace=False` a non-empty `target` that appeared meanwhile is
    a FileExistsError and nothing is replaced. `mode`: the finished directory's permissions (mkdtemp makes it
    private; what we write is read by other users, e.g. a service)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix or f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, mode)
        old = None
        if target.exists():
            if not replace and (not target.is_dir() or any(target.iterdir())):
                raise FileExistsError(f"{target} appeared while it was being written; nothing was replaced")
            old = target.with_name(f".old-{target.name}-{secrets.token_hex(4)}")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created with its parents). Lock files are never deleted:
    deleting one while another process waits on it would let a third take a fresh lock beside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield  # closing the file releases the lock


@contextmanager
def atomic_file(target: str | Path, mode: int = 0o644) -> Iterator[Path]:
    """A temporary file beside `target` to write; on success it replaces `target` in one rename, on any failure
    (Ctrl-C included) it is removed, so a reader never sees a half-written file at `target`."""
    target = Path(target)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, mode)  # mkstemp makes it private; an exported model is read by other tools and users
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
