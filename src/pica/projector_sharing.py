"""Projectors computed once across processes: each rank computes a disjoint share, then the shares are exchanged.

When every process of a ``torch.distributed`` job holds the same base weights (DDP, or FSDP where every
rank loads the model), each one computing every projector repeats the same work once per process (for
an SVD-initialised method, the slowest part of creating the adapter). :func:`compute_projectors` splits
that work instead. Every rank runs the same steps, in the same order:

1. **Agree.** ``all_gather_object`` of a summary of the local work: the rank and compute dtype asked
   for, and per matrix its shape and the bytes of its fingerprint (:func:`pica.fingerprint.weight_fingerprint`,
   cheap). Work is shared only if every summary is identical (and not empty); otherwise every rank computes
   its own projectors and nothing more is exchanged. Under rank-0 loading (the other ranks build the model
   on the meta device and compute nothing) rank 0 thus computes every projector, and they reach the other
   ranks with the state-dict broadcast.
2. **Assign** (:func:`assign_shares`): largest estimated cost first (:func:`projector_cost`), each matrix
   to the rank with the least work so far; every rank derives the same assignment from the agreed summary.
3. **Compute** the local share with :func:`pica.projector_batch.top_right_singular_vectors_many`, whose
   results are bitwise those of the one-matrix call: so every ``P`` is bitwise what one process computes.
4. **Agree on success.** ``all_gather_object`` of each rank's outcome: if any rank failed, every rank
   raises (naming the failed ranks and their errors) before any tensor is exchanged, so no rank is left
   waiting in a broadcast.
5. **Exchange.** One ``broadcast`` per matrix, from the rank that computed it.

Sharing is on by default whenever a process group with more than one rank is initialised. It is a
collective: every rank of the default group must create the adapter (as every ``torchrun`` /
``accelerate launch`` training script does). A process that creates an adapter alone (e.g. rank 0
evaluating on its own) must turn sharing off, with :func:`projector_sharing` or the environment variable
``PICA_SHARE_PROJECTORS=0`` (read at each call), on every rank alike.

This module is pure torch: it imports neither ``peft`` nor ``transformers``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.distributed as dist

from .projector_batch import LazyWeight, top_right_singular_vectors_many

logger = logging.getLogger(__name__)

__all__ = ["SHARING_ENVIRONMENT_VARIABLE", "assign_shares", "compute_projectors", "projector_cost",
           "projector_sharing", "projector_sharing_enabled"]

SHARING_ENVIRONMENT_VARIABLE = "PICA_SHARE_PROJECTORS"
"""``0`` / ``false`` / ``off`` / ``no`` turns sharing off for this process (unless :func:`projector_sharing` overrides it)."""
_EIGEN_WEIGHT = 4.0  # eigh of a k×k Gram costs ~4 of its k³ products on one CPU thread (fits projector_init_18layers.json)
_enabled_here: list[bool] = []  # stack of projector_sharing() blocks; the innermost decides


def projector_sharing_enabled() -> bool:
    """Whether :func:`compute_projectors` may share work: the innermost :func:`projector_sharing` block, else
    the environment variable ``PICA_SHARE_PROJECTORS`` (default on)."""
    if _enabled_here:
        return _enabled_here[-1]
    return os.environ.get(SHARING_ENVIRONMENT_VARIABLE, "1").strip().lower() not in ("0", "false", "off", "no")


@contextlib.contextmanager
def projector_sharing(enabled: bool) -> Iterator[None]:
    """Turn sharing of the projector work across ranks on or off inside the block (this process only: do the
    same on every rank, since sharing is a collective).

    Args:
        enabled: False: every rank computes every projector of its own weights, with no collective.
    """
    _enabled_here.append(bool(enabled))
    try:
        yield
    finally:
        _enabled_here.pop()


def projector_cost(shape: tuple[int, int]) -> float:
    """Estimated cost of one projector: the Gram matrix of the smaller side and its eigensolver.

    ``long·short² + 4·short³`` for a ``(out_features, in_features)`` weight with ``short = min``, ``long = max``
    (the factor 4 makes the estimate follow the measured single-thread times of the Gemma-2B shapes,
    ``benchmarks/results/projector_init_18layers.json``: 2048×2048 : 16384×2048 ≈ 0.45). The rank does not
    enter: the block of the Rayleigh-Ritz step is small next to the Gram.
    """
    short, long = min(shape), max(shape)
    return float(long) * short * short + _EIGEN_WEIGHT * float(short) ** 3


def assign_shares(costs: Sequence[float], world_size: int) -> list[int]:
    """Owner rank of each task: largest cost first, each to the rank with the least assigned cost so far
    (ties: the lower rank; equal costs: the earlier task). Deterministic, so every rank derives the same.

    Args:
        costs: estimated cost of each task.
        world_size: number of ranks.

    Returns:
        The owner rank of each task, in the order of ``costs``.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    owners = [0] * len(costs)
    loads = [0.0] * world_size
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        owner = min(range(world_size), key=lambda r: (loads[r], r))
        owners[index] = owner
        loads[owner] += costs[index]
    return owners


def _summary(weights: Sequence[torch.Tensor | LazyWeight], fingerprints: Sequence[torch.Tensor], rank: int,
             compute_dtype: torch.dtype) -> tuple:
    """What the ranks must have in common to share: settings, and per matrix its shape and fingerprint bytes."""
    matrices = tuple((tuple(weight.shape), fingerprint.detach().to("cpu", torch.float64).numpy().tobytes())
                     for weight, fingerprint in zip(weights, fingerprints, strict=True))
    return rank, str(compute_dtype), matrices


def _wire_device(device: torch.device) -> torch.device:
    """Device a tensor must be on for this backend's broadcast: CPU for gloo, a CUDA device for NCCL."""
    backend = str(dist.get_backend()).lower()
    if device.type == "cuda" and "nccl" not in backend:
        return torch.device("cpu")
    if device.type == "cpu" and "gloo" not in backend and "mpi" not in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return device


def compute_projectors(
    weights: Sequence[torch.Tensor | LazyWeight],
    rank: int,
    compute_dtype: torch.dtype,
    fingerprints: Sequence[torch.Tensor],
    done: Callable[[int], None] | None = None,
) -> list[torch.Tensor]:
    """The projector of every weight, each computed by one rank only when the ranks hold the same weights.

    Without an initialised process group of more than one rank, or with sharing turned off
    (:func:`projector_sharing_enabled`), this is :func:`pica.projector_batch.top_right_singular_vectors_many`.
    Otherwise the protocol of this module's docstring runs; it is a collective, so every rank must call it
    (even with no weights: a rank whose base is on the meta device takes part in step 1, and computes nothing).

    Args:
        weights: ``(out_features_i, in_features_i)`` weights (or :class:`pica.projector_batch.LazyWeight` s).
        rank: number of singular vectors of each.
        compute_dtype: ``torch.float32`` or ``torch.float64``, as in :func:`pica.projector.top_right_singular_vectors`.
        fingerprints: ``(FINGERPRINT_SIZE,)`` fingerprint of each weight, in the order of ``weights``.
        done: called with the index of each weight when its projector is ready here (computed or received).

    Returns:
        ``[(rank, in_features_i)]`` projectors in ``compute_dtype``, in the order of ``weights``, each on the
        device of its weight.

    Raises:
        RuntimeError: on every rank, if computing the share failed on any rank (naming ranks and errors).
    """
    if not (projector_sharing_enabled() and dist.is_available() and dist.is_initialized()
            and dist.get_world_size() > 1):
        return top_right_singular_vectors_many(weights, rank, compute_dtype, done=done)
    world_size, here = dist.get_world_size(), dist.get_rank()
    summaries: list = [None] * world_size
    dist.all_gather_object(summaries, _summary(weights, fingerprints, rank, compute_dtype))
    if not weights or any(summary != summaries[0] for summary in summaries):
        logger.info("PiCa projectors: not shared across the %d ranks (%s): %d computed on rank %d", world_size,
                    "nothing to compute" if not weights else "they do not hold the same weights", len(weights), here)
        return top_right_singular_vectors_many(weights, rank, compute_dtype, done=done)
    owners = assign_shares([projector_cost(tuple(weight.shape)) for weight in weights], world_size)
    mine = [index for index, owner in enumerate(owners) if owner == here]
    results: list[torch.Tensor | None] = [None] * len(weights)
    outcome, failure = (True, ""), None
    try:
        computed = top_right_singular_vectors_many([weights[i] for i in mine], rank, compute_dtype,
                                                   done=None if done is None else lambda j: done(mine[j]))
        for index, projector in zip(mine, computed):
            results[index] = projector
    except Exception as error:  # noqa: BLE001 - raised on every rank below, after the ranks agree
        outcome, failure = (False, f"{type(error).__name__}: {error}"), error
    outcomes: list = [None] * world_size
    dist.all_gather_object(outcomes, outcome)
    failed = {r: message for r, (ok, message) in enumerate(outcomes) if not ok}
    if failed:
        message = f"PiCa projectors shared across {world_size} ranks failed on rank(s) {sorted(failed)}: {failed}"
        raise RuntimeError(message) from failure  # the cause: this rank's own error, if it failed
    for index, (weight, owner) in enumerate(zip(weights, owners)):
        device = weight.device
        wire = _wire_device(device)
        if owner == here:
            buffer = results[index].to(wire)  # (rank, in_features)
        else:
            buffer = torch.empty(rank, weight.shape[1], dtype=compute_dtype, device=wire)  # (rank, in_features)
        dist.broadcast(buffer, src=owner)
        if owner != here:
            results[index] = buffer.to(device)
            if done is not None:
                done(index)
    logger.info("PiCa projectors shared across %d ranks: rank %d computed %d of %d", world_size, here, len(mine),
                len(weights))
    return results  # type: ignore[return-value]
