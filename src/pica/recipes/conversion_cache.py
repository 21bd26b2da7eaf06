"""The cache of checkpoints converted once from another format (GGUF, ONNX), keyed by the source file's hash.

An entry is ``<cache>/<kind>/<stem>-<sha256[:16]>``: a transformers checkpoint written whole or not at
all (:func:`pica.io.atomic_directory`), with a marker file written last that names the source and its
SHA-256; an entry whose marker is missing or names another hash is not used.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional, Union

import torch

from ..io import atomic_directory

__all__ = ["CACHE_ENV", "cache_entry", "cache_root", "file_sha256", "valid_entry", "write_entry"]

CACHE_ENV = "PICA_CACHE_DIR"
"""Environment variable overriding the cache folder (default ``~/.cache/pica``)."""


def file_sha256(path: Union[str, os.PathLike], chunk_bytes: int = 1 << 22) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cache_root(kind: str) -> Path:
    """``$PICA_CACHE_DIR/<kind>`` if set, else ``~/.cache/pica/<kind>``, on every operating system.

    Not ``platformdirs``: its default would move the folder on macOS (``~/Library/Caches``) and Windows
    (``%LOCALAPPDATA%``) away from the ``~/.cache`` folder the Hugging Face caches pica's models come from
    use on every system, and orphan the entries converted so far; ``PICA_CACHE_DIR`` places it anywhere.
    """
    base = os.environ.get(CACHE_ENV)
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "pica") / kind


def cache_entry(kind: str, source: Path, sha256: str, cache_dir: Optional[Union[str, os.PathLike]] = None) -> Path:
    """``<cache_dir or cache_root(kind)>/<stem>-<sha256[:16]>`` (:func:`cache_root`)."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root(kind)
    return root / f"{source.stem}-{sha256[:16]}"


def valid_entry(directory: Path, marker_file: str, sha256: str) -> bool:
    """Whether ``directory`` is a complete entry converted from the file of hash ``sha256``."""
    try:
        return json.loads((directory / marker_file).read_text(encoding="utf-8")).get("sha256") == sha256
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def write_entry(target: Path, marker_file: str, source: Path, sha256: str, what: str,
                save: Callable[[Path], None], **marker: Any) -> Path:
    """Write an entry: ``save(staging)`` writes the checkpoint, then the marker (source, size, hash, versions,
    ``marker``) goes last. A concurrent process that finished the same conversion first wins.

    Returns:
        ``target``.
    """
    import transformers

    record = {"source": str(source), "size_bytes": source.stat().st_size, "sha256": sha256, **marker,
              "transformers": transformers.__version__, "torch": torch.__version__}
    try:
        with atomic_directory(target, overwrite=target.exists(), what=what) as staging:
            save(staging)
            (staging / marker_file).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    except OSError:
        if not valid_entry(target, marker_file, sha256):  # else another process finished the same conversion first
            raise
    return target
