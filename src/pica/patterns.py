"""The cost of the regular expressions an adapter file makes peft run, bounded before peft runs them (pure Python).

peft matches every module name of the model against patterns built from ``adapter_config.json``:
``target_modules`` and ``exclude_modules`` strings in full, each ``modules_to_save`` entry and each
``layers_pattern`` entry interpolated into patterns of its own. Python's ``re`` backtracks, so a
small file can make a load run for hours (``(?:[\\w.]+)+!`` is exponential in the name's length),
and ``re`` cannot be interrupted from another thread. :func:`check_pattern_cost` runs exactly those
matches first in a separate Python process with a time limit, and refuses the file if they do not
finish. Patterns a user writes in code are not checked: that cost is theirs to choose.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterable, Mapping
from typing import Any

from .io import AdapterFileError

__all__ = ["PATTERN_SECONDS", "PatternCostError", "check_pattern_cost", "peft_matches"]

PATTERN_SECONDS = 10.0
"""Longest time the file's patterns may take on every module name of the model."""

_CHILD = """
import json, re, sys
job = json.load(sys.stdin)
for how, pattern in job["matches"]:
    run = re.fullmatch if how == "fullmatch" else re.match
    compiled = re.compile(pattern)
    for name in job["names"]:
        run(compiled, name)
"""


class PatternCostError(AdapterFileError):
    """An adapter file's patterns are invalid or take too long to match the model's module names."""


def peft_matches(config: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """``(field, "fullmatch" | "match", pattern)`` for each regular expression peft builds from ``config``.

    Args:
        config: the adapter config's fields (``adapter_config.json`` as read).
    """
    matches = []
    for field in ("target_modules", "exclude_modules"):
        if isinstance(config.get(field), str):
            matches.append((field, "fullmatch", config[field]))
    for entry in config.get("modules_to_save") or ():
        matches.append(("modules_to_save", "match", rf"(^|.*\.){entry}($|\..*)"))
    layers = config.get("layers_pattern")
    if config.get("layers_to_transform") is not None and layers:
        for entry in [layers] if isinstance(layers, str) else layers:
            matches.append(("layers_pattern", "match", rf"(?:^|.*?\.){entry}\.(?P<idx>\d+)\."))
    return matches


def _plain(matches: Iterable[tuple[str, str, str]], config: Mapping[str, Any]) -> bool:
    """Whether every user-given part is a plain name (no regex syntax but dots): nothing to bound."""
    parts = [pattern for field, _, pattern in matches if field in ("target_modules", "exclude_modules")]
    parts += list(config.get("modules_to_save") or ())
    layers = config.get("layers_pattern")
    parts += [layers] if isinstance(layers, str) else list(layers or ())
    return all(isinstance(part, str) and re.fullmatch(r"[\w.\-]*", part) for part in parts)


def check_pattern_cost(config: Mapping[str, Any], names: Iterable[str], source: str,
                       seconds: float | None = None) -> None:
    """Refuse a config whose patterns are invalid, or do not match ``names`` within ``seconds``.

    Args:
        config: the adapter config's fields as read from ``source``.
        names: every module name of the model peft will match.
        source: the file, for messages.
        seconds: the time limit (default :data:`PATTERN_SECONDS`).

    Raises:
        PatternCostError: naming the file and field (and the pattern).
    """
    seconds = PATTERN_SECONDS if seconds is None else seconds
    matches = peft_matches(config)
    if not matches or _plain(matches, config):
        return
    for field, _, pattern in matches:
        try:
            re.compile(pattern)
        except re.error as error:
            raise PatternCostError(f"{source}: {field} is not a valid regular expression ({error}): {pattern!r}") from None
    job = json.dumps({"matches": [(how, pattern) for _, how, pattern in matches], "names": list(names)})
    try:
        subprocess.run([sys.executable, "-I", "-S", "-c", _CHILD], input=job, text=True, timeout=seconds,
                       check=True, capture_output=True)
    except subprocess.TimeoutExpired:
        fields = sorted({field for field, _, _ in matches})
        raise PatternCostError(
            f"{source}: matching {fields} against the model's module names takes more than {seconds:g} s (a "
            "regular expression that backtracks, e.g. nested repetition); refusing to load it. Write the "
            "modules as a list of names, or a simpler pattern") from None
    except subprocess.CalledProcessError as error:
        raise PatternCostError(f"{source}: cannot match its patterns: {error.stderr.strip()[-500:]}") from None
