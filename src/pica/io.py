"""Files of an adapter or output directory: crash-safe directory writes and checks of what is on disk.

This module knows nothing about ``peft``: it only handles paths, JSON and safetensors, so it can be
tested on its own. ``pica.tuner.integration`` uses it from peft's save and load paths, the ``pica``
command and the exports for their output directories.

**Staging.** Every file is written completely into a hidden *staging* directory on the target's own
filesystem, flushed to disk (a failed flush is an error: nothing is replaced), and only then moved
in with :func:`os.replace`. Staging directories are named ``.<name>.pica-<state>-<pid>-<token>@<host>``
(``<name>`` is empty inside the target) and go through three states, each entered by one atomic
rename: ``partial`` (being written), ``complete`` (every file written and flushed: the new version is
decided), ``old`` (a replaced directory waiting to be deleted). The next write to the same place (or
the next PiCa load of it) finishes what a killed process left: a ``partial`` directory of a process
that no longer exists is deleted (its write never happened), a ``complete`` one is moved in (its write
happened), an ``old`` one is deleted once the new directory is in place, or put back otherwise.

Two writers:

* :func:`atomic_directory_update` (``save_pretrained``, Trainer checkpoints): stages *inside* the
  target, so it works wherever the target is writable (a mount point, a symlink to another
  filesystem, a read-only parent), and holds an exclusive lock on the target directory for the whole
  save, so concurrent saves into one directory take turns instead of mixing their files; readers take
  the shared lock (:func:`reading_directory`).
* :func:`atomic_directory` (whole outputs: ``pica train``, exports, analysis, the GGUF cache): stages
  beside the target and renames it into place; where that cannot work (the target is a mount point or
  on another filesystem than its parent, or the parent is read-only) it stages inside the existing
  target and swaps the entries.

Directories are created with mode ``0o777`` minus the umask, as ``mkdir`` does (``tempfile.mkdtemp``'s
``0o700`` would hide exports from a serving process running as another user).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import secrets
import shutil
import socket
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

try:
    import fcntl
except ImportError:  # pragma: no cover  (Windows: no advisory locks; saves are still staged and flushed)
    fcntl = None

logger = logging.getLogger(__name__)

__all__ = [
    "AdapterFileError",
    "OutputWouldDeleteInputError",
    "atomic_directory",
    "atomic_directory_update",
    "check_output_directory",
    "check_safetensors_file",
    "directory_lock",
    "finish_interrupted_save",
    "nesting_depth",
    "read_json_object",
    "reading_directory",
    "refuse_replacing_inputs",
]


class AdapterFileError(ValueError):
    """An adapter file is missing, unreadable or malformed. The message names the file."""


# ----------------------------------------------------------------------------------- flushing


_NO_DIRECTORY_SYNC = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF, errno.EISDIR}


def _fsync_file(path: Path) -> None:
    """Flush a file's data to disk.

    Raises:
        OSError: naming the file, if the data may not have reached the disk.
    """
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    except OSError as error:
        raise OSError(error.errno, f"cannot flush {path} to disk ({error.strerror or error}); "
                                   "nothing was replaced") from error
    finally:
        os.close(descriptor)


def _fsync_directory(path: Path) -> None:
    """Flush a directory's entry table (the renames in it) to disk, where the platform can.

    Filesystems and platforms that cannot sync a directory (Windows, some network filesystems) are
    skipped; any other error (e.g. ``EIO``) is raised, naming the directory.
    """
    try:
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # directories cannot be opened on some platforms (Windows)
        return
    try:
        os.fsync(descriptor)
    except OSError as error:
        if error.errno not in _NO_DIRECTORY_SYNC:
            raise OSError(error.errno, f"cannot flush directory {path} to disk ({error.strerror or error})") from error
    finally:
        os.close(descriptor)


def _fsync_tree(root: Path) -> None:
    """Flush every file under ``root``, then every directory (deepest first)."""
    directories = [root]
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            _fsync_file(path)
        elif path.is_dir():
            directories.append(path)
    for directory in sorted(directories, key=lambda p: len(p.parts), reverse=True):
        _fsync_directory(directory)


# ------------------------------------------------------------------------------------ locking


_UNLOCKABLE_WARNED: set[str] = set()


@contextlib.contextmanager
def directory_lock(path: str | os.PathLike, shared: bool = False) -> Iterator[bool]:
    """Hold an advisory lock (``flock``) on an existing directory.

    Writers take it exclusively, readers shared, so a reader never sees half of a concurrent save.
    Where the filesystem or platform has no locks (Windows, some network filesystems) a warning is
    logged once per directory and the block runs unlocked.

    Yields:
        True if the lock is held.
    """
    path = Path(path)
    if fcntl is None:
        yield False
        return
    descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            locked = True
        except OSError as error:
            locked = False
            if str(path) not in _UNLOCKABLE_WARNED:
                _UNLOCKABLE_WARNED.add(str(path))
                logger.warning("%s: no file locks on this filesystem (%s); concurrent saves into it are not "
                               "serialised", path, error)
        yield locked
    finally:
        os.close(descriptor)  # closing the descriptor releases the lock


# ---------------------------------------------------------------------------- staging names


_STAGING = re.compile(r"^\.(?:(?P<name>.+)\.)?pica-(?P<state>partial|complete|old)-(?P<pid>\d+)-(?P<token>[0-9a-f]{8})"
                      r"@(?P<host>.+)$")
_ORDER_FILE = ".pica-order.json"


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "host"


def _staging_path(directory: Path, name: str, state: str) -> Path:
    prefix = f".{name}." if name else "."
    return directory / f"{prefix}pica-{state}-{os.getpid()}-{secrets.token_hex(4)}@{_host()}"


def _with_state(path: Path, state: str) -> Path:
    match = _STAGING.match(path.name)
    assert match is not None, path
    prefix = f".{match['name']}." if match["name"] else "."
    return path.with_name(f"{prefix}pica-{state}-{match['pid']}-{match['token']}@{match['host']}")


def _owner_alive(match: re.Match) -> bool:
    """Whether the process that made a staging directory may still be running (unknown → True)."""
    if match["host"] != _host() or os.name != "posix":
        return True
    pid = int(match["pid"])
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stagings(directory: Path, name: str) -> list[tuple[Path, re.Match]]:
    """Staging directories of ``name`` (``""``: those inside a target) in ``directory``."""
    found = []
    with contextlib.suppress(OSError):
        for entry in directory.iterdir():
            match = _STAGING.match(entry.name)
            if match and (match["name"] or "") == name and entry.is_dir() and not entry.is_symlink():
                found.append((entry, match))
    return found


def _make_directory(path: Path) -> Path:
    """``mkdir`` with the umask's permissions (not ``mkdtemp``'s 0700)."""
    os.mkdir(path, 0o777)
    return path


def _remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _has_entries(directory: Path) -> bool:
    """Whether ``directory`` holds anything other than pica's own staging directories."""
    return any(not _STAGING.match(entry.name) for entry in directory.iterdir())


def _move(source: Path, destination: Path) -> None:
    """``os.replace``; a file on another filesystem is copied next to ``destination``, flushed and renamed."""
    try:
        os.replace(source, destination)
        return
    except OSError as error:
        if error.errno != errno.EXDEV or not source.is_file():
            raise
    copy = destination.with_name(f".{destination.name}.pica-copy-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        shutil.copy2(source, copy)
        _fsync_file(copy)
        os.replace(copy, destination)
    finally:
        copy.unlink(missing_ok=True)
    source.unlink()


def _commit(staging: Path, target: Path, last: Sequence[str]) -> list[Path]:
    """Move every file of ``staging`` into ``target`` (same relative paths); names in ``last`` go last."""
    files = sorted((p for p in staging.rglob("*") if p.is_file() and p.relative_to(staging) != Path(_ORDER_FILE)),
                   key=lambda p: (p.name in last, str(p)))
    moved = []
    for file in files:
        destination = target / file.relative_to(staging)
        destination.parent.mkdir(parents=True, exist_ok=True)
        _move(file, destination)
        moved.append(destination)
    for directory in sorted({m.parent for m in moved} | {target}, key=lambda p: len(p.parts), reverse=True):
        _fsync_directory(directory)
    return moved


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
    target.mkdir(parents=True, exist_ok=True)
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


# ------------------------------------------------------------- whole directories: outputs


def _finish_beside(parent: Path) -> None:
    """Finish or discard what killed writers of outputs in ``parent`` left (hidden siblings of them).

    Killed after writing everything (``complete``): published. Killed after moving the previous output
    aside (``old``): deleted if the new one is in place, put back otherwise. Killed while writing
    (``partial``): deleted. Directories of live processes, or made on other hosts, are left alone.
    """
    order = ("complete", "old", "partial")
    found = [(entry, match) for entry in parent.iterdir() if (match := _STAGING.match(entry.name)) and match["name"]]
    for entry, match in sorted(found, key=lambda item: order.index(item[1]["state"])):
        if _owner_alive(match) or not entry.is_dir() or entry.is_symlink():
            continue
        out_dir = parent / match["name"]
        if match["state"] == "complete":
            _publish(entry, out_dir)
            logger.warning("%s: published the output of a run that was killed while publishing it", out_dir)
        elif match["state"] == "old" and not out_dir.exists():
            os.replace(entry, out_dir)
            logger.warning("%s: put back the previous directory (a run was killed while replacing it)", out_dir)
        else:
            _remove(entry)
            logger.info("%s: removed %s, left by a killed run", parent, entry.name)


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


# ------------------------------------------------------------------------------ file checks


def nesting_depth(value: Any, limit: int) -> int:
    """Levels of nested lists/mappings in a parsed JSON/YAML ``value`` (0 for a scalar), counted up to
    ``limit + 1``, one level per pass: no recursion, so a crafted ``[[[[...]]]]`` cannot overflow the stack."""
    depth, level = 0, [value]
    while depth <= limit:
        level = [item for item in level if isinstance(item, (dict, list))]
        if not level:
            break
        depth += 1
        level = [child for item in level for child in (item.values() if isinstance(item, dict) else item)]
    return depth


def read_json_object(path: str | os.PathLike) -> dict[str, Any]:
    """Read a JSON file that must hold an object.

    Arrays and objects may nest at most 100 levels deep: no adapter or run file needs more, and a
    deeper value (a crafted ``[[[[...]]]]``) would otherwise end in a ``RecursionError`` here or in
    whatever walks the value next.

    Raises:
        AdapterFileError: missing file or not a regular file, unreadable, invalid JSON (with
            line/column), nested too deeply, or not an object.
    """
    max_depth = 100
    path = Path(path)
    if not path.is_file():
        raise AdapterFileError(f"{path} does not exist" if not path.exists() else f"{path} is not a regular file")
    try:
        value = json.loads(path.read_text(encoding="utf-8-sig"))  # a leading UTF-8 BOM is allowed
    except UnicodeDecodeError as error:
        raise AdapterFileError(f"{path} is not UTF-8 text: {error}") from error
    except json.JSONDecodeError as error:
        raise AdapterFileError(f"{path} is not valid JSON: {error}") from error
    except RecursionError:
        raise AdapterFileError(f"{path}: JSON nested too deeply (more than {max_depth} levels)") from None
    except OSError as error:
        raise AdapterFileError(f"{path} cannot be read: {error}") from error
    if nesting_depth(value, max_depth) > max_depth:
        raise AdapterFileError(f"{path}: JSON nested too deeply (more than {max_depth} levels)")
    if not isinstance(value, dict):
        raise AdapterFileError(f"{path} must hold a JSON object, got {type(value).__name__}")
    return value


def check_safetensors_file(path: str | os.PathLike) -> list[str]:
    """Check that ``path`` is a complete safetensors file, reading only its header.

    safetensors verifies that the header parses and that the tensors cover the file exactly, so a
    truncated, empty or random-bytes file is caught without reading the tensors.

    Returns:
        The tensor names in the file.

    Raises:
        AdapterFileError: missing, empty, or malformed file (the message names it).
    """
    path = Path(path)
    if not path.is_file():
        raise AdapterFileError(f"{path} does not exist")
    if path.stat().st_size == 0:
        raise AdapterFileError(f"{path} is empty (0 bytes)")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys())
    except (SafetensorError, OSError, ValueError) as error:
        raise AdapterFileError(f"{path} is not a valid safetensors file (truncated or corrupt?): {error}") from error



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

