"""Files of an adapter directory: atomic directory updates and checks of what is on disk.

This module knows nothing about ``peft``: it only handles paths, JSON and safetensors, so it can be
tested on its own. ``pica.tuner.integration`` uses it from peft's save and load paths.

Atomicity model: every file is written completely into a temporary *staging* directory next to the
target (same filesystem), flushed to disk, and only then moved into the target with
:func:`os.replace`, which is atomic on POSIX and Windows. A crash or exception while writing (the
long part) leaves the target untouched; at every instant each file in the target is either its
complete old or its complete new version. Files are moved in a fixed order (weights before the
config), in a window of a few system calls.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

logger = logging.getLogger(__name__)

__all__ = [
    "AdapterFileError",
    "atomic_directory",
    "atomic_directory_update",
    "check_safetensors_file",
    "read_json_object",
]


class AdapterFileError(ValueError):
    """An adapter file is missing, unreadable or malformed. The message names the file."""


def _fsync(path: Path) -> None:
    """Flush a file (or, on POSIX, a directory entry table) to disk."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if path.is_dir() else os.O_RDONLY
    try:
        descriptor = os.open(path, flags)
    except OSError:  # directories cannot be opened on some platforms (Windows)
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _commit(staging: Path, target: Path, last: Sequence[str]) -> list[Path]:
    """Move every file of ``staging`` into ``target`` (same relative paths); names in ``last`` go last."""
    files = sorted((p for p in staging.rglob("*") if p.is_file()), key=lambda p: (p.name in last, str(p)))
    for file in files:
        _fsync(file)
    moved = []
    for file in files:
        destination = target / file.relative_to(staging)
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.replace(file, destination)
        moved.append(destination)
    for directory in {m.parent for m in moved} | {target}:
        _fsync(directory)
    return moved


@contextlib.contextmanager
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
        for file in (p for p in staging.rglob("*") if p.is_file()):
            _fsync(file)
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


@contextlib.contextmanager
def atomic_directory_update(
    target: str | os.PathLike, seed_files: Sequence[str] = (), last: Sequence[str] = ()
) -> Iterator[Path]:
    """Stage files for ``target`` in a temporary sibling directory, then move them in.

    Files already in ``target`` that the caller does not write are kept. On an exception inside the
    block nothing in ``target`` changes and the staging directory is removed.

    Args:
        target: directory to update (created if missing).
        seed_files: names of existing files in ``target`` copied into the staging directory first
            (e.g. a model card the writer updates rather than replaces).
        last: file names moved after all others (e.g. the config that describes the weights).

    Yields:
        The staging directory to write into.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise AdapterFileError(f"{target} exists and is not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.saving-", dir=target.parent))
    try:
        for name in seed_files:
            if (target / name).is_file():
                shutil.copy2(target / name, staging / name)
        yield staging
        target.mkdir(exist_ok=True)
        moved = _commit(staging, target, last)
        logger.debug("atomically wrote %d file(s) into %s", len(moved), target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


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
    level, depth = [value], 0
    while level:  # breadth-first, one nesting level per pass: no recursion
        depth += 1
        if depth > max_depth:
            raise AdapterFileError(f"{path}: JSON nested too deeply (more than {max_depth} levels)")
        level = [child for item in level if isinstance(item, (dict, list))
                 for child in (item.values() if isinstance(item, dict) else item) if isinstance(child, (dict, list))]
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


from collections.abc import Mapping  # noqa: E402


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


__all__ += ["OutputWouldDeleteInputError", "refuse_replacing_inputs"]
