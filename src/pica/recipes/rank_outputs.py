"""Where a run's outputs go when several processes run it: only the main process publishes.

Under ``torchrun`` / ``accelerate launch`` every process trains and evaluates (FSDP needs them all in
every forward); rank 0 builds the output with :func:`pica.io.atomic_directory`, the others write into a
private temporary directory that is removed at the end.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from ..io import atomic_directory

__all__ = ["is_distributed", "is_main_process", "rank_output_directory"]


def is_main_process() -> bool:
    """True unless this is a non-zero rank of a ``torchrun`` / ``accelerate launch`` job (``RANK`` is set).

    Read from the launcher's environment, before and without any process group: accelerate's
    ``PartialState().is_main_process`` answers the same but initialises the process group under
    ``torchrun`` as a side effect.
    """
    return int(os.environ.get("RANK", "0")) == 0


def is_distributed() -> bool:
    """Whether a ``torch.distributed`` process group is running."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


@contextlib.contextmanager
def _private_directory() -> Iterator[Path]:
    """A temporary directory for a non-zero rank's copy of the outputs, removed at the end."""
    with tempfile.TemporaryDirectory(prefix=f".pica-rank{os.environ['RANK']}-") as private:
        yield Path(private)


@contextlib.contextmanager
def rank_output_directory(output: Path, overwrite: bool) -> Iterator[Path]:
    """The staging directory of the run: published atomically by the main process only.

    The processes meet at a barrier before rank 0 publishes, so a failure on any rank publishes nothing.
    """
    directory = atomic_directory(output, overwrite, "output_dir") if is_main_process() else _private_directory()
    with directory as staging:
        yield staging
        if is_distributed():
            torch.distributed.barrier()
