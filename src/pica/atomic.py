"""Atomic creation of an output directory: build it next to the target, then rename it into place."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_directory"]


@contextmanager
def atomic_directory(out_dir: str | os.PathLike, overwrite: bool = False, what: str = "output") -> Iterator[Path]:
    """Yield an empty staging directory that becomes ``out_dir`` only if the block succeeds.

    The staging directory is a hidden sibling of ``out_dir`` (same filesystem, so the final
    ``os.replace`` is atomic). If the block raises, the staging directory is removed and ``out_dir``
    is untouched. With ``overwrite``, an existing ``out_dir`` is moved aside and deleted only once
    the new one is in place, so a crash leaves either the old or the new directory whole.

    Args:
        out_dir: the directory to create.
        overwrite: replace an existing ``out_dir``.
        what: a name for error messages (e.g. ``"export_lora"``).

    Raises:
        FileExistsError: ``out_dir`` exists and ``overwrite`` is False (checked before any work).
        NotADirectoryError: ``out_dir`` exists and is a file.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"{what}: {out_dir} exists and is not a directory")
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{what}: {out_dir} exists; pass overwrite=True to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp.", dir=out_dir.parent))
    try:
        yield staging
        previous = None
        if out_dir.exists():
            previous = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
            os.replace(out_dir, previous / out_dir.name)
        os.replace(staging, out_dir)
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
