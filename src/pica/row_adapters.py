"""One adapter per row for the calls inside a block: ``adapter_names=...`` handed to chosen modules of a model
through forward pre-hooks (pure torch)."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence

from torch import nn

__all__ = ["adapter_names_per_row"]


def _with_adapter_names(module: nn.Module, args: tuple, kwargs: dict, names: list[str]) -> tuple[tuple, dict]:
    return args, {**kwargs, "adapter_names": names}


@contextlib.contextmanager
def adapter_names_per_row(model: nn.Module, receives: Callable[[nn.Module], bool], names: Sequence[str],
                          beams: object = None, encoder: nn.Module | None = None) -> Iterator[None]:
    """While the block runs, every module of ``model`` that ``receives`` is called with ``adapter_names``: ``names``
    (one per input row), each repeated ``beams`` times when ``beams`` is an int > 1 (generate's beam search), except
    in ``encoder`` (an encoder-decoder's), whose rows are the original ones."""
    per_row = [name for name in names for _ in range(beams if isinstance(beams, int) and beams > 1 else 1)]
    routes = [(model, per_row)] + ([(encoder, list(names))] if encoder is not None and per_row != list(names) else [])
    handles = [module.register_forward_pre_hook(functools.partial(_with_adapter_names, names=rows), with_kwargs=True)
               for root, rows in routes for module in root.modules() if receives(module)]  # later hooks win
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
