"""Read rows of a local data file (.jsonl, .json list, .csv) with their location for error messages."""

from __future__ import annotations

import codecs
import contextlib
import csv
import json
import os
from pathlib import Path
from typing import Any, Iterator

__all__ = ["DATA_SUFFIXES", "iter_rows"]

DATA_SUFFIXES = (".jsonl", ".json", ".csv")
CSV_FIELD_LIMIT = 64 * 1024 * 1024
"""Longest CSV field read (64 Mi characters; Python's default of 128 Ki is too small for long documents)."""


def iter_rows(path: str | os.PathLike, *, encoding: str = "utf-8",
              allow_csv: bool = True) -> Iterator[tuple[str, dict]]:
    """Yield ``(location, row)``: location is ``"<file>:<line>"`` (JSONL/CSV, 1-based) or
    ``"<file>[<index>]"`` (JSON list, 0-based index).

    The one reader of local data rows: ``classify`` and the generative tasks
    (:func:`pica.recipes.tasks.generative.read_records`) both read through it. The suffix is matched
    case-insensitively.

    Args:
        path: a ``.jsonl``, ``.json`` (a list of objects) or ``.csv`` file.
        encoding: text encoding of the file.
        allow_csv: accept ``.csv`` files.

    A UTF-8 file may start with a byte-order mark (as spreadsheet programs write it): it is skipped,
    not read into the first column name or the first JSON value.

    Raises:
        FileNotFoundError: naming the path.
        ValueError: unknown suffix or encoding, unparsable line/file, a JSON value nested too deeply,
            a CSV field longer than :data:`CSV_FIELD_LIMIT`, or a row that is not an object (naming
            file and line).
    """
    path = Path(path)
    if not path.is_file():
        if path.exists():
            raise ValueError(f"{path}: not a regular file (a data file was expected)")
        raise FileNotFoundError(f"data file not found: {path}")
    declared = encoding
    try:
        if codecs.lookup(encoding).name == "utf-8":
            encoding = "utf-8-sig"  # reads plain UTF-8 too
    except LookupError:
        raise ValueError(f"{path}: unknown encoding {encoding!r} (the encoding option)") from None
    suffixes = DATA_SUFFIXES if allow_csv else (".jsonl", ".json")
    suffix = path.suffix.lower()
    if suffix not in suffixes:
        raise ValueError(f"{path}: unsupported data file type {path.suffix!r}; use one of {list(suffixes)}")
    try:
        if suffix == ".jsonl":
            yield from _jsonl(path, encoding)
        elif suffix == ".json":
            yield from _json_list(path, encoding)
        else:
            yield from _csv(path, encoding)
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not valid {declared} text ({error}); set the encoding option") from None


def _jsonl(path: Path, encoding: str) -> Iterator[tuple[str, dict]]:
    with path.open(encoding=encoding) as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: invalid JSON ({error.msg})") from None
            except RecursionError:
                raise ValueError(f"{path}:{number}: JSON nested too deeply") from None
            yield f"{path}:{number}", _object(row, f"{path}:{number}")


def _json_list(path: Path, encoding: str) -> Iterator[tuple[str, dict]]:
    try:
        data: Any = json.loads(path.read_text(encoding=encoding))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}:{error.lineno}: invalid JSON ({error.msg})") from None
    except RecursionError:
        raise ValueError(f"{path}: JSON nested too deeply") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: a .json data file must hold a list of objects, got {type(data).__name__}")
    for index, row in enumerate(data):
        yield f"{path}[{index}]", _object(row, f"{path}[{index}]")


@contextlib.contextmanager
def _csv_field_limit(limit: int) -> Iterator[None]:
    """Raise the csv module's (process-wide) field size limit for the block, then restore it."""
    previous = csv.field_size_limit(limit)
    try:
        yield
    finally:
        csv.field_size_limit(previous)


def _csv(path: Path, encoding: str) -> Iterator[tuple[str, dict]]:
    with path.open(encoding=encoding, newline="") as handle, _csv_field_limit(CSV_FIELD_LIMIT):
        reader = csv.DictReader(handle)
        try:
            if not reader.fieldnames:
                raise ValueError(f"{path}: empty CSV file (no header row)")
            for row in reader:
                if None in row or any(value is None for value in row.values()):
                    raise ValueError(f"{path}:{reader.line_num}: expected {len(reader.fieldnames)} columns "
                                     f"{reader.fieldnames}, got a different number")
                yield f"{path}:{reader.line_num}", row
        except csv.Error as error:
            hint = "; use a .jsonl file for longer texts" if "field larger" in str(error) else ""
            raise ValueError(f"{path}:{reader.line_num + 1}: malformed CSV: {error}{hint}") from None


def _object(row: Any, location: str) -> dict:
    if not isinstance(row, dict):
        raise ValueError(f"{location}: each row must be a JSON object, got {type(row).__name__}")
    return row


def load_datasets_source(source: str, refusal: str):
    """A ``datasets`` source ``NAME[:CONFIG][@SPLIT]`` (split default ``train``), loaded.

    Args:
        source: the source string.
        refusal: the start of the error message (e.g. ``"classify: cannot load 'x' as a file or"``).

    Raises:
        ValueError: ``refusal`` + `` a datasets source NAME[:CONFIG][@SPLIT]: <why>``.
    """
    spec, _, split = source.partition("@")
    name, _, config = spec.partition(":")
    try:
        from datasets import load_dataset

        return load_dataset(name, config or None, split=split or "train")
    except Exception as error:  # hub unreachable, unknown name, bad split
        raise ValueError(f"{refusal} a datasets source NAME[:CONFIG][@SPLIT]: {error}") from None
