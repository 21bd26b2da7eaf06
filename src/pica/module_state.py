"""Put a module tree back exactly as it was after a failed operation (pure torch)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["restore_on_error"]


def _snapshot(module: nn.Module) -> dict[str, Any]:
    """Every attribute of ``module`` by identity, and the contents of its dicts, lists and sets."""
    attributes = dict(vars(module))
    contents = {name: (value.copy() if isinstance(value, (dict, set)) else list(value))
                for name, value in attributes.items() if isinstance(value, (dict, list, set))}
    return {"attributes": attributes, "contents": contents}


def _restore(module: nn.Module, snapshot: dict[str, Any]) -> None:
    current = vars(module)
    current.clear()
    current.update(snapshot["attributes"])
    for name, content in snapshot["contents"].items():
        container = current[name]
        container.clear()
        (container.update if isinstance(container, (dict, set)) else container.extend)(content)


@contextlib.contextmanager
def restore_on_error(root: nn.Module) -> Iterator[None]:
    """On an exception, put ``root`` and every module under it back as they were, then re-raise.

    Restored: each module's attributes (so its submodules, parameters, buffers and hooks, and every
    peft bookkeeping dict/list such as ``peft_config`` or active adapters), ``requires_grad`` and
    training flags. Tensor values are not touched by a failed load (checks run before
    ``load_state_dict``), so they are not copied.
    """
    modules = list(root.modules())
    snapshots = [(module, _snapshot(module)) for module in modules]
    flags = [(parameter, parameter.requires_grad) for parameter in root.parameters()]
    try:
        yield
    except BaseException:
        try:
            for module, snapshot in snapshots:
                _restore(module, snapshot)
            for parameter, requires_grad in flags:
                parameter.requires_grad_(requires_grad)
        except Exception:  # noqa: BLE001  (never hide the original error)
            logger.exception("PiCa: could not undo a failed adapter load")
        raise
