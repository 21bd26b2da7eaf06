"""Crash-safe updates of an adapter directory (``save_pretrained``, Trainer checkpoints) and locked reads."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

from .files import AdapterFileError
from .staging import (_commit, _fsync_directory, _fsync_tree, _make_directory, _owner_alive, _remove,
                      _staging_path, _stagings, _with_state, _ORDER_FILE, directory_lock)

logger = logging.getLogger(__name__)

__all__ = ["atomic_directory_update", "finish_interrupted_save", "reading_directory"]


# ------------------------------------------------------------------- updates: save_pretrained


def _finish_updates(target: Path, locked: bool) -> None:
    """Finish or discard what killed saves left inside ``target`` (caller holds the exclusive lock)."""
    for entry, match in _stagings(target, ""):
        if match["state"] == "complete":
            order = entry / _ORDER_FILE
            last = json.loads(order.read_text(encoding="utf-8")) if order.is_file() else []
            moved = _commit(entry, target, last)
            _remove(entry)
            logger.warning("%s: finished moving in %d file(s) of a save that was interrupted after writing them",
                           target, len(moved))
        elif locked or not _owner_alive(match):
            _remove(entry)
            logger.info("%s: removed %s, left by a save that was interrupted while writing", target, entry.name)


@contextlib.contextmanager
def atomic_directory_update(
    target: str | os.PathLike, seed_files: Sequence[str] = (), last: Sequence[str] = ()
) -> Iterator[Path]:
    """Stage files for ``target`` inside it, then move them in; the other files of ``target`` are kept.

    The whole save holds an exclusive lock on ``target`` (and, while moving in, on its existing
    subdirectories), so concurrent saves take turns. What a kill leaves behind, at each moment:
    while writing, ``target`` is untouched and a hidden ``.pica-partial-*`` directory inside it is
    removed by the next save; once every file is written and flushed, the staging directory is renamed
    ``.pica-complete-*`` (the new version is decided) and its files are moved in one by one, weights
    before ``last``; a kill in that window leaves some files moved, and the next save or PiCa load of
    ``target`` moves in the rest before doing anything else (:func:`reading_directory`).

    Args:
        target: directory to update (created if missing, with its parents).
        seed_files: names of existing files in ``target`` copied into the staging directory first
            (e.g. a model card the writer updates rather than replaces).
        last: file names moved after all others (e.g. the config that describes the weights).

    Yields:
        The staging directory to write into.

    Raises:
        AdapterFileError: ``target`` is a file.
        OSError: a write or flush failed (``target`` unchanged), naming the file.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise AdapterFileError(f"{target} exists and is not a directory")
    created = [path for path in (target, *target.parents) if not path.exists()]  # deepest first
    target.mkdir(parents=True, exist_ok=True)
    try:
        with _updating(target, seed_files, last) as staging:
            yield staging
    except BaseException:
        for path in created:  # a failed first save leaves no empty directory behind (rmdir: only if empty)
            with contextlib.suppress(OSError):
                path.rmdir()
        raise


@contextlib.contextmanager
def _updating(target: Path, seed_files: Sequence[str], last: Sequence[str]) -> Iterator[Path]:
    """The locked staging and move-in of :func:`atomic_directory_update` into the existing ``target``."""
    with directory_lock(target) as locked:
        _finish_updates(target, locked)
        staging = _make_directory(_staging_path(target, "", "partial"))
        try:
            for name in seed_files:
                if (target / name).is_file():
                    shutil.copy2(target / name, staging / name)
            yield staging
            (staging / _ORDER_FILE).write_text(json.dumps(list(last)), encoding="utf-8")
            _fsync_tree(staging)
            complete = _with_state(staging, "complete")
            os.replace(staging, complete)
            _fsync_directory(target)
            with contextlib.ExitStack() as subdirectories:
                for directory in sorted({p.relative_to(complete).parent for p in complete.rglob("*") if p.is_file()}):
                    if directory != Path(".") and (target / directory).is_dir():
                        subdirectories.enter_context(directory_lock(target / directory))
                try:
                    moved = _commit(complete, target, last)
                except OSError as error:
                    raise OSError(error.errno, f"{target}: save interrupted while moving files in ({error}); the "
                                               f"written files are kept in {complete.name} and the next save or "
                                               "load of this directory moves them in") from error
            _remove(complete)
            logger.debug("atomically wrote %d file(s) into %s", len(moved), target)
        finally:
            _remove(staging)


def finish_interrupted_save(path: str | os.PathLike) -> None:
    """Move in the files of a save into ``path`` that was killed while moving them (see
    :func:`atomic_directory_update`); nothing to do otherwise.

    Raises:
        AdapterFileError: there is such a save and it cannot be finished here (e.g. a read-only
            filesystem).
    """
    path = Path(path)
    if not path.is_dir() or not any(match["state"] == "complete" for _, match in _stagings(path, "")):
        return
    try:
        with directory_lock(path) as locked:
            _finish_updates(path, locked)
    except OSError as error:
        raise AdapterFileError(f"{path}: a save into this directory was interrupted while its files were moved "
                               f"in, and cannot be finished here ({error}); save the adapter again") from error


@contextlib.contextmanager
def reading_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Hold the shared lock of an adapter directory while reading it, after :func:`finish_interrupted_save`.

    Raises:
        AdapterFileError: as :func:`finish_interrupted_save`.
    """
    path = Path(path)
    finish_interrupted_save(path)
    if not path.is_dir():
        yield path
        return
    with directory_lock(path, shared=True):
        yield path
