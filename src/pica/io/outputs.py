"""Whole output directories that appear complete or not at all, and never replace an input."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

from .staging import (_STAGING, _fsync_directory, _fsync_tree, _has_entries, _make_directory, _owner_alive,
                      _remove, _staging_path, _stagings, _with_state)

logger = logging.getLogger(__name__)

__all__ = ["OutputWouldDeleteInputError", "atomic_directory", "check_output_directory", "refuse_replacing_inputs"]


# ------------------------------------------------------------- whole directories: outputs


def _finish_beside(parent: Path) -> None:
    """Finish or discard what killed writers of outputs in ``parent`` left (hidden siblings of them).

    Killed after writing everything (``complete``): published if nothing is at its output's path.
    Killed after moving the previous output aside (``old``): put back if nothing is at its path.
    Either one meets something at that path (the interrupted write's own result, or a directory the
    user made since: pica cannot tell which): both are kept, the leftover under a visible name beside
    it (:func:`_keep_beside`), and a warning says where. Killed while writing (``partial``): deleted.
    Directories of live processes, or made on other hosts, are left alone. Nothing a user made is
    ever deleted or replaced here.
    """
    order = ("complete", "old", "partial")
    found = [(entry, match) for entry in parent.iterdir() if (match := _STAGING.match(entry.name)) and match["name"]]
    for entry, match in sorted(found, key=lambda item: order.index(item[1]["state"])):
        if _owner_alive(match) or not entry.is_dir() or entry.is_symlink():
            continue
        out_dir = parent / match["name"]
        if match["state"] == "partial":
            _remove(entry)
            logger.info("%s: removed %s, left by a killed run", parent, entry.name)
        elif os.path.lexists(out_dir):
            kept = _keep_beside(entry, out_dir, "interrupted" if match["state"] == "complete" else "previous",
                                match["token"])
            logger.warning("%s: a run was killed while %s it, and %s is there now; kept both: the run's %s is %s",
                           out_dir, "publishing" if match["state"] == "complete" else "replacing", out_dir.name,
                           "output" if match["state"] == "complete" else "previous directory", kept)
        else:
            os.replace(entry, out_dir)
            _fsync_directory(parent)
            logger.warning("%s: %s (a run was killed while %s it)", out_dir,
                           "published the output" if match["state"] == "complete" else "put back the previous directory",
                           "publishing" if match["state"] == "complete" else "replacing")


def _keep_beside(entry: Path, out_dir: Path, what: str, token: str) -> Path:
    """Rename a leftover to ``<out_dir>.pica-<what>-<token>[-n]``: visible, never replacing anything."""
    for attempt in range(1000):
        kept = out_dir.with_name(f"{out_dir.name}.pica-{what}-{token}" + (f"-{attempt}" if attempt else ""))
        if not os.path.lexists(kept):
            os.rename(entry, kept)
            return kept
    raise FileExistsError(f"{out_dir}: no free name to keep {entry.name} under")


def _publish(complete: Path, out_dir: Path) -> None:
    """Rename a complete staging directory to ``out_dir``, moving an existing one aside first."""
    old = None
    if out_dir.exists():
        old = _with_state(complete, "old")
        os.replace(out_dir, old)
    try:
        os.replace(complete, out_dir)
    except OSError:
        if old is not None:
            os.replace(old, out_dir)
        raise
    _fsync_directory(out_dir.parent)
    if old is not None:
        _remove(old)


def _stages_beside(out_dir: Path) -> bool:
    """Whether ``out_dir`` can be replaced by renaming a sibling (same filesystem, writable parent)."""
    parent = out_dir.parent
    if not out_dir.exists():
        return True
    if not os.access(parent, os.W_OK | os.X_OK) or os.path.ismount(out_dir):
        return False
    return out_dir.stat().st_dev == parent.stat().st_dev


@contextlib.contextmanager
def _beside(out_dir: Path) -> Iterator[Path]:
    staging = _make_directory(_staging_path(out_dir.parent, out_dir.name, "partial"))
    complete = _with_state(staging, "complete")
    try:
        yield staging
        _fsync_tree(staging)
        os.replace(staging, complete)
        _fsync_directory(out_dir.parent)
        _publish(complete, out_dir)
    finally:
        _remove(staging)
        _remove(complete)


@contextlib.contextmanager
def _inside(out_dir: Path) -> Iterator[Path]:
    """Stage inside an existing ``out_dir`` whose entries are then swapped (mount points, read-only parents)."""
    for entry, match in _stagings(out_dir, "swap"):
        if not _owner_alive(match):
            if match["state"] == "partial":
                _remove(entry)
            else:
                logger.warning("%s: %s was left by a run killed while swapping the directory's entries; check "
                               "the directory and remove it by hand", out_dir, entry.name)
    staging = _make_directory(_staging_path(out_dir, "swap", "partial"))
    try:
        yield staging
        _fsync_tree(staging)
        complete = _with_state(staging, "complete")
        os.replace(staging, complete)
        old = _make_directory(_with_state(staging, "old"))
        for entry in list(out_dir.iterdir()):
            if not _STAGING.match(entry.name):
                os.replace(entry, old / entry.name)
        for entry in list(complete.iterdir()):
            os.replace(entry, out_dir / entry.name)
        _fsync_directory(out_dir)
        _remove(old)
        _remove(complete)
    finally:
        _remove(staging)


def check_output_directory(out_dir: str | os.PathLike, overwrite: bool, what: str = "output",
                           inputs: Mapping[str, str | os.PathLike | None] | None = None) -> None:
    """Refuse an output directory before any work is done (also called by :func:`atomic_directory`).

    Args:
        out_dir: the directory to write.
        overwrite: whether an existing, non-empty ``out_dir`` may be replaced.
        what: the option or function named in errors (``"output_dir"``, ``"export_lora"``).
        inputs: the run's inputs by name; ``out_dir`` must not be or contain one of them, nor the
            working directory (:func:`refuse_replacing_inputs`, which is always applied).

    Raises:
        OutputWouldDeleteInputError: replacing ``out_dir`` would delete an input or the working directory.
        NotADirectoryError: ``out_dir`` exists and is not a directory.
        FileExistsError: ``out_dir`` holds files and ``overwrite`` is False (an empty one is used as it is).
    """
    out_dir = Path(out_dir)
    refuse_replacing_inputs(out_dir, inputs or {}, what)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"{what}: {out_dir} exists and is not a directory")
    if out_dir.is_dir() and not overwrite and _has_entries(out_dir):
        raise FileExistsError(f"{what}: {out_dir} exists and is not empty; pass --overwrite (overwrite=True) to "
                              "replace it")


@contextlib.contextmanager
def atomic_directory(out_dir: str | os.PathLike, overwrite: bool = False, what: str = "output",
                     inputs: Mapping[str, str | os.PathLike | None] | None = None) -> Iterator[Path]:
    """Yield an empty staging directory that becomes ``out_dir`` only if the block succeeds.

    The staging directory is a hidden sibling of ``out_dir`` (``.<name>.pica-partial-*``, same
    filesystem), renamed ``.<name>.pica-complete-*`` once every file is flushed, then renamed to
    ``out_dir``; an existing ``out_dir`` (``overwrite``) is renamed aside first and deleted last. If
    the block raises, nothing changes. A kill leaves at most one hidden directory, which the next
    write of ``out_dir`` finishes (a complete one is published, the replaced one deleted) or deletes
    (a partial one); partial directories of killed writers of other outputs in the same parent are
    deleted too. A symlink ``out_dir`` is written through (its target is replaced). Where a sibling
    cannot be renamed over ``out_dir`` (a mount point, another filesystem than the parent, a read-only
    parent), the staging directory is made inside ``out_dir`` and the entries are swapped at the end
    (a kill during that swap of a few renames leaves ``.swap.pica-*`` directories to check by hand).

    Args:
        out_dir: the directory to create. An existing empty one is used without ``overwrite``.
        overwrite: replace an existing ``out_dir``.
        what: a name for error messages (e.g. ``"export_lora"``).
        inputs: what the caller read, by name: never replaced (:func:`check_output_directory`).

    Raises:
        OutputWouldDeleteInputError, NotADirectoryError, FileExistsError: as
            :func:`check_output_directory` (before any work).
        OSError: a write or flush failed (nothing replaced), naming the file.
    """
    out_dir = Path(out_dir)
    if out_dir.is_symlink():
        out_dir = out_dir.resolve()
    out_dir = out_dir.absolute()
    if out_dir.parent.is_dir():
        _finish_beside(out_dir.parent)
    check_output_directory(out_dir, overwrite, what, inputs)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    writer = _beside if _stages_beside(out_dir) else _inside
    with writer(out_dir) as staging:
        yield staging


class OutputWouldDeleteInputError(ValueError):
    """Replacing an output directory would delete one of the run's inputs (or the working directory)."""


def refuse_replacing_inputs(
    out_dir: str | os.PathLike,
    inputs: Mapping[str, str | os.PathLike | None],
    what: str = "output",
) -> None:
    """Refuse an output directory whose replacement (``overwrite``) would delete an input.

    Replacing ``out_dir`` deletes everything under it, so it must neither be nor contain an input
    (model, data file, recipe, the adapter being read, ...) nor the current working directory (or
    hold it as a subdirectory: ``--output-dir .`` or ``--output-dir ..``). An output *inside* an
    input (``--output-dir RUN/eval``) is fine. Paths are compared both as written (made absolute)
    and with symlinks resolved, so a link on either side is seen through. Inputs that do not exist
    on disk (hub ids, dataset names, ``None``) cannot be deleted and are skipped; so is an
    ``out_dir`` that does not exist yet.

    Args:
        out_dir: the directory that would be replaced.
        inputs: a name for each input (``"model"``, ``"train_data"``, ...) → its path.
        what: the option or function named in the error (e.g. ``"output_dir"``, ``"export_lora"``).

    Raises:
        OutputWouldDeleteInputError: naming the output and the input it would delete.
    """

    def forms(path: str | os.PathLike) -> set[Path]:
        written = Path(os.path.abspath(Path(path).expanduser()))
        return {written, written.resolve()}

    if not Path(out_dir).expanduser().exists():
        return
    outputs = forms(out_dir)
    candidates = [(name, path) for name, path in inputs.items() if path is not None and str(path) != ""]
    candidates.append(("current working directory", Path.cwd()))
    for name, path in candidates:
        if not Path(path).expanduser().exists():
            continue
        for output in outputs:
            for form in forms(path):
                if form == output or output in form.parents:
                    relation = "is" if form == output else "contains"
                    raise OutputWouldDeleteInputError(
                        f"{what}: refusing to replace {out_dir}: it {relation} the {name} {path} (replacing it "
                        "would delete it); choose another output directory"
                    )
