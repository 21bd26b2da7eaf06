"""Building blocks of crash-safe directory writes: flushing, advisory locks, staging-directory names.

Staging directories are named ``.<name>.pica-<state>-<pid>-<token>@<host>`` (``<name>`` is empty inside
a target); see :mod:`pica.io` for the states and what the writers do with them.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import secrets
import shutil
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover  (Windows: no advisory locks; saves are still staged and flushed)
    fcntl = None

logger = logging.getLogger(__name__)

__all__ = ["directory_lock"]


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
