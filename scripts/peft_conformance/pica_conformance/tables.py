"""Extend a test module's parametrize tables after import, without editing or mutating peft's objects.

A contributor adds rows to e.g. ``TEST_CASES`` in ``tests/test_custom_models.py``. Here the module is
imported unchanged; :func:`extend_tables` binds ``module.<TABLE>`` to a new list/tuple with the extra rows
and replaces every ``parametrize`` mark whose argument values *are* the old table (identity, not equality)
with an equal mark over the new one. Marks are rebuilt through the public ``pytest.mark.parametrize``.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any, Optional

import pytest

__all__ = ["TableError", "extend_tables"]


class TableError(Exception):
    """A table named in the PiCa rows is missing from the module, or is not used the way we expect."""


def _functions(module: ModuleType) -> list[Any]:
    """Every function of the module, and every function of its classes (inherited ones included)."""
    found: list[Any] = []
    for value in vars(module).values():
        if inspect.isfunction(value):
            found.append(value)
        elif inspect.isclass(value):
            for klass in value.__mro__:
                found.extend(member for member in vars(klass).values() if inspect.isfunction(member))
    return found


def _replace_marks(target: Any, old: Sequence[Any], new: Sequence[Any]) -> int:
    marks = getattr(target, "pytestmark", None)
    if not isinstance(marks, list):
        return 0
    replaced = 0
    for index, mark in enumerate(marks):
        if mark.name != "parametrize" or len(mark.args) < 2 or mark.args[1] is not old:
            continue
        ids = mark.kwargs.get("ids")
        if ids is not None and not callable(ids):
            raise TableError(f"{getattr(target, '__qualname__', target)}: parametrize with an explicit ids list "
                             "cannot take extra rows")
        marks[index] = pytest.mark.parametrize(mark.args[0], new, *mark.args[2:], **mark.kwargs).mark
        replaced += 1
    return replaced


def extend_tables(module: ModuleType, extra_rows: Mapping[str, Sequence[Any]],
                  derived: Mapping[str, Sequence[Any]] = {}) -> dict[str, int]:
    """Add ``extra_rows[name]`` to each table ``module.<name>`` and to the parametrize marks that use it.

    Args:
        module: the imported test module.
        extra_rows: table name → rows to append. Each table must exist, be a list or tuple, and be used by at
            least one parametrize mark.
        derived: tables computed from others at import time (e.g. ``ALL_PEFT_CONFIG_CLASSES`` from
            ``TEST_CASES``): same treatment, but they need not be used by a mark (tests may loop over them).

    Returns:
        table name → number of parametrize marks rewritten.

    Raises:
        TableError: a table is missing or of another type, or a required table is used by no mark.
    """
    counts: dict[str, int] = {}
    functions = _functions(module)
    for name, rows in {**extra_rows, **derived}.items():
        old = getattr(module, name, None)
        if not isinstance(old, (list, tuple)):
            raise TableError(f"{module.__name__}.{name} is {type(old).__name__}, expected a list or tuple table; "
                             "the peft version may have changed")
        new = type(old)([*old, *rows])
        setattr(module, name, new)
        targets = [module, *functions]
        targets += [value for value in vars(module).values() if inspect.isclass(value)]
        counts[name] = sum(_replace_marks(target, old, new) for target in targets)
        if name in extra_rows and counts[name] == 0:
            raise TableError(f"{module.__name__}.{name}: no parametrize mark uses this table; the rows would "
                             "never run")
    return counts


def replace_values(module: ModuleType, name: str, mapping: Mapping[Any, Any],
                   keep: Optional[Sequence[Any]] = None) -> int:
    """Point every value of table ``module.<name>`` at ``mapping[value]``, keeping the test ids.

    ``module.<name>`` becomes a new table of the mapped values (for tests that read it directly), and each
    parametrize mark over the old table becomes one over ``pytest.param(mapping[value], id=str(value))``,
    so items keep the ids (and node ids) they have in peft's own runs. Used to point peft's Hub model ids
    at local stand-ins. ``keep``: if given, the marks hold only these values (the module's table keeps all).

    Returns:
        number of parametrize marks rewritten.

    Raises:
        TableError: the table is missing, not a list/tuple of values that are all in ``mapping``, or used by
            no parametrize mark.
    """
    old = getattr(module, name, None)
    if not isinstance(old, (list, tuple)):
        raise TableError(f"{module.__name__}.{name} is {type(old).__name__}, expected a list or tuple table; "
                         "the peft version may have changed")
    missing = [value for value in old if value not in mapping]
    if missing:
        raise TableError(f"{module.__name__}.{name}: no local stand-in for {missing}")
    setattr(module, name, type(old)(mapping[value] for value in old))
    rows = [pytest.param(mapping[value], id=str(value)) for value in old if keep is None or value in keep]
    targets = [module, *_functions(module), *(value for value in vars(module).values() if inspect.isclass(value))]
    count = sum(_replace_marks(target, old, rows) for target in targets)
    if count == 0:
        raise TableError(f"{module.__name__}.{name}: no parametrize mark uses this table")
    return count


def extend_inline(module: ModuleType, qualname: str, argnames: str, rows: Sequence[Any]) -> None:
    """Add ``rows`` to the list written inline in the parametrize mark ``argnames`` of test ``qualname``.

    For tests whose rows are not a module table but a list in the decorator (``"TestClass.test_name"``),
    where a contributor adds the rows of a new method in place.

    Raises:
        TableError: no such test, or no parametrize mark with these argument names on it.
    """
    target: Any = module
    for part in qualname.split("."):
        target = getattr(target, part, None)
        if target is None:
            raise TableError(f"{module.__name__}.{qualname} does not exist; the peft version may have changed")
    marks = getattr(target, "pytestmark", [])
    for mark in marks:
        if mark.name == "parametrize" and mark.args[0] == argnames:
            if _replace_marks(target, mark.args[1], [*mark.args[1], *rows]) != 1:
                raise TableError(f"{module.__name__}.{qualname}: cannot extend the {argnames!r} rows")
            return
    raise TableError(f"{module.__name__}.{qualname} has no parametrize mark over {argnames!r}")
