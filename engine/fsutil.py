"""Filesystem helper shared by everything that writes a whole directory."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_directory(target: str | Path, prefix: str | None = None) -> Iterator[Path]:
    """A temporary directory beside `target` to fill; on success it becomes `target` (an old one is replaced),
    on any failure (Ctrl-C included) it is removed, so a half-written directory never appears at `target`."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix or f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
