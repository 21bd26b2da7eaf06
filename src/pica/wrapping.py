"""Wrapping functions that classes or modules hold, idempotently and reversibly (pure Python).

A target is ``(owner, attribute, body)``: its wrapper calls ``body(original, *args, **kwargs)``, keeps the original in
``__pica_original__`` (so a wrapped function is never wrapped twice), and is a classmethod where the original was one.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["ORIGINAL", "Target", "is_wrapped", "unwrap", "wrap"]

ORIGINAL = "__pica_original__"
Target = tuple[Any, str, Callable[..., Any]]


def is_wrapped(targets: Iterable[Target]) -> bool:
    """True if every target is wrapped."""
    return all(hasattr(_held(owner, attribute)[0], ORIGINAL) for owner, attribute, _ in targets)


def wrap(targets: Iterable[Target]) -> None:
    """Wrap every target that is not wrapped yet."""
    for owner, attribute, body in targets:
        original, is_classmethod = _held(owner, attribute)
        if not hasattr(original, ORIGINAL):
            wrapper = _wrapper(body, original)
            setattr(owner, attribute, classmethod(wrapper) if is_classmethod else wrapper)


def unwrap(targets: Iterable[Target]) -> None:
    """Put every wrapped target's original back."""
    for owner, attribute, _ in targets:
        current, is_classmethod = _held(owner, attribute)
        if (original := getattr(current, ORIGINAL, None)) is not None:
            setattr(owner, attribute, classmethod(original) if is_classmethod else original)


def _held(owner: Any, attribute: str) -> tuple[Callable[..., Any], bool]:
    """The function ``owner`` itself holds as ``attribute``, and whether it holds it as a classmethod."""
    raw = vars(owner)[attribute]
    return (raw.__func__, True) if isinstance(raw, classmethod) else (raw, False)


def _wrapper(body: Callable[..., Any], original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return body(original, *args, **kwargs)

    setattr(wrapper, ORIGINAL, original)
    return wrapper
