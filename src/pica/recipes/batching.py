"""Shared steps of the tasks' evaluation loops: the model in eval mode for a block, batches with a progress bar."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

from torch import nn

__all__ = ["batch_starts", "eval_mode"]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode inside the block, back in the mode it had after it (also on an error)."""
    was_training = bool(getattr(model, "training", False))
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def batch_starts(count: int, batch_size: int, progress: bool, description: str = "eval") -> Iterable[int]:
    """``range(0, count, batch_size)`` behind a tqdm bar (hidden unless ``progress``)."""
    from tqdm.auto import tqdm

    return tqdm(range(0, count, batch_size), desc=description, unit="batch", disable=not progress)
