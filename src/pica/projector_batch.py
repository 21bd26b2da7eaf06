"""Projectors of many matrices at once: whole matrices side by side, one intra-op thread each.

The dense symmetric eigensolver and the float64 checks in :func:`pica.projector.top_right_singular_vectors`
are memory- and latency-bound and scale poorly with intra-op threads, so ``get_peft_model`` runs
``torch.get_num_threads()`` single-threaded matrices at once instead, as many as fit in memory.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from .projector import top_right_singular_vectors, torch_threads

logger = logging.getLogger(__name__)

__all__ = ["LazyWeight", "projector_task_bytes", "top_right_singular_vectors_many"]


@dataclass(frozen=True)
class LazyWeight:
    """A weight that exists only while its projector is computed (e.g. one de-quantised on demand).

    Attributes:
        shape: ``(out_features, in_features)``.
        device: device of the tensor ``load`` returns.
        load: returns the ``(out_features, in_features)`` weight; called once, inside the task.
    """

    shape: tuple[int, int]
    device: torch.device
    load: Callable[[], torch.Tensor]

    def numel(self) -> int:
        """Number of entries of the weight."""
        return self.shape[0] * self.shape[1]


def projector_task_bytes(shape: tuple[int, int], rank: int, materialised: bool = False) -> int:
    """Upper estimate of the working memory of one :func:`top_right_singular_vectors` call on CPU.

    A float64 copy of ``W`` (``8·out·in``), the Gram matrix, its eigenvectors and the float64
    retry (``32·k²`` with ``k = min(out, in)``), and the float64 Rayleigh-Ritz products
    (``16·max(out, in)·block``). Measured peaks are 0.5-0.75 of this (16384×2048 at rank 256:
    255 MB measured, 487 MB estimated). ``materialised``: the task also holds the float32 weight it
    created (a :class:`LazyWeight`, ``4·out·in``).
    """
    out_features, in_features = shape
    small, large = min(shape), max(shape)
    block = min(small, rank + max(32, rank // 4))
    weight = 4 * out_features * in_features if materialised else 0
    return weight + 8 * out_features * in_features + 32 * small * small + 16 * large * block


def _default_workers(shapes: Sequence[tuple[int, int]], rank: int, materialised: bool = False) -> int:
    """``torch.get_num_threads()``, lowered so that that many of the largest tasks fit in half of the
    available memory (a 64-core machine must not run 64 copies of a 7B model's largest matrix)."""
    threads = torch.get_num_threads()
    if threads <= 1 or len(shapes) <= 1:
        return threads
    try:
        import psutil  # a dependency of accelerate

        available = int(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001 - no estimate: keep the thread count
        return threads
    largest = max(projector_task_bytes(shape, min(rank, *shape), materialised) for shape in shapes)
    fit = max(1, int(available // 2 // largest))
    if fit < threads:
        logger.info("projectors: %d matrices at once instead of %d (%.1f GB available, %.2f GB per matrix)",
                    fit, threads, available / 1e9, largest / 1e9)
    return min(threads, fit)


def top_right_singular_vectors_many(
    weights: Sequence[torch.Tensor | LazyWeight],
    rank: int,
    compute_dtype: torch.dtype = torch.float32,
    workers: int | None = None,
    done: Callable[[int], None] | None = None,
) -> list[torch.Tensor]:
    """:func:`top_right_singular_vectors` of several weights, one single-threaded task per CPU thread.

    The dense eigensolver and the float64 checks are memory- and latency-bound and scale poorly
    with intra-op threads; running whole matrices side by side (largest first) uses the cores
    better. Each result is bitwise identical to the one-matrix call.

    Args:
        weights: ``(out_features_i, in_features_i)`` weights, or :class:`LazyWeight` s loaded inside
            their task (so at most ``workers`` of them exist at once).
        rank: number of singular vectors of each.
        compute_dtype: as in :func:`top_right_singular_vectors`.
        workers: parallel tasks (default ``torch.get_num_threads()``, lowered to what fits in half of
            the available memory, see :func:`projector_task_bytes`); CPU weights only, others run one
            after another.
        done: called with the index of each weight as soon as its projector is ready (from a
            worker thread), e.g. to report progress.

    Returns:
        ``[(rank, in_features_i)]`` projectors, in the order of ``weights``.
    """
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    results: list[torch.Tensor] = [torch.empty(0)] * len(weights)
    on_cpu = sorted((i for i, weight in enumerate(weights) if weight.device.type == "cpu"),
                    key=lambda i: -weights[i].numel())  # largest first: balanced finish
    if workers is None:
        lazy = any(isinstance(weights[i], LazyWeight) for i in on_cpu)
        workers = _default_workers([tuple(weights[i].shape) for i in on_cpu], rank, materialised=lazy)

    def run(index: int) -> None:
        weight = weights[index]
        matrix = weight.load() if isinstance(weight, LazyWeight) else weight  # (out, in)
        results[index] = top_right_singular_vectors(matrix, rank, compute_dtype)
        del matrix
        if done is not None:
            done(index)

    for i, weight in enumerate(weights):
        if weight.device.type != "cpu":
            run(i)
    if workers == 1 or len(on_cpu) <= 1:
        for index in on_cpu:
            run(index)
    else:
        with torch_threads(1), ThreadPoolExecutor(max_workers=min(workers, len(on_cpu))) as pool:
            list(pool.map(run, on_cpu))  # re-raises the first error
    return results
