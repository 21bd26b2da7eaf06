"""Checks of what is on disk: JSON objects, safetensors files, the error type of bad adapter files.

Pure: only paths, JSON and safetensors (no peft), so it can be tested on its own.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

__all__ = ["AdapterFileError", "check_safetensors_file", "nesting_depth", "read_json_object",
           "read_safetensors_file"]


class AdapterFileError(ValueError):
    """An adapter file is missing, unreadable or malformed. The message names the file."""


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
    def names(file: str) -> list[str]:
        with safe_open(file, framework="pt") as handle:
            return list(handle.keys())

    return _read_safetensors(path, names)


def read_safetensors_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read every tensor of a complete safetensors file, in one read (the checks of :func:`check_safetensors_file`).

    Raises:
        AdapterFileError: missing, empty, or malformed file (the message names it).
    """
    return _read_safetensors(path, load_file)


def _read_safetensors(path: str | os.PathLike, read: Callable[[str], Any]) -> Any:
    path = Path(path)
    if not path.is_file():
        raise AdapterFileError(f"{path} does not exist")
    if path.stat().st_size == 0:
        raise AdapterFileError(f"{path} is empty (0 bytes)")
    try:
        return read(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise AdapterFileError(f"{path} is not a valid safetensors file (truncated or corrupt?): {error}") from error
