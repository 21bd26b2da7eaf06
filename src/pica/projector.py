"""Top-``rank`` right singular vectors of a weight and their canonical signs.

This module is pure torch: it imports neither ``peft`` nor ``transformers``.

Conventions (PyTorch layout): a linear weight is ``W0 ∈ R^{out×in}``. The projector of a layer is
``P ∈ R^{rank×in}``, the top-``rank`` rows of ``Vh`` in ``W0 = U diag(S) Vh``, i.e. the principal
directions of the layer's *input* space.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "LEAK_TOLERANCE",
    "canonicalize_signs",
    "torch_threads",
    "top_right_singular_vectors",
]

_SUPPORTED_DTYPES = (torch.float32, torch.float64)


def canonicalize_signs(vectors: torch.Tensor) -> torch.Tensor:
    """Flip each row so that its largest-magnitude entry is positive.

    Singular vectors are unique only up to sign; this rule picks one representative so that the
    same matrix gives the same ``P`` whatever the LAPACK/cuSOLVER route.

    Args:
        vectors: ``(rank, in_features)`` rows to canonicalise.

    Returns:
        ``(rank, in_features)`` tensor with the same rows, some negated.
    """
    pivot = vectors.abs().argmax(dim=1, keepdim=True)  # (rank, 1)
    signs = torch.sign(vectors.gather(1, pivot))  # (rank, 1)
    signs[signs == 0] = 1
    return vectors * signs


def _gram(side: torch.Tensor, blocks: int = 4) -> torch.Tensor:
    """``sideᵀ side`` from the upper block triangle only (the lower blocks are its transposes).

    ``blocks`` column blocks cost ``(blocks + 1) / (2 blocks)`` of one full product (5/8 for 4).

    Args:
        side: ``(long, short)`` matrix.
        blocks: number of column blocks (a plain product below 512 columns).

    Returns:
        ``(short, short)`` symmetric Gram matrix in ``side.dtype``.
    """
    short = side.shape[1]
    if short < 512:
        return side.T @ side
    edges = [short * i // blocks for i in range(blocks + 1)]
    gram = side.new_empty(short, short)  # (short, short)
    for i in range(blocks):
        rows = slice(edges[i], edges[i + 1])
        for j in range(i, blocks):
            cols = slice(edges[j], edges[j + 1])
            block = side[:, rows].T @ side[:, cols]  # (rows, cols)
            gram[rows, cols] = block
            if j != i:
                gram[cols, rows] = block.T
    return gram


def _gram_error_norm(gram: torch.Tensor, side: torch.Tensor, probes: int = 4, steps: int = 3) -> float:
    """Estimate ``‖gram − sideᵀ side‖₂`` (the rounding error of a Gram matrix) by block power iteration.

    Args:
        gram: ``(short, short)`` computed Gram matrix.
        side: ``(long, short)`` float64 matrix it was computed from.
        probes: block size.
        steps: power iterations (the estimate approaches the norm from below).

    Returns:
        The largest ``‖E z‖`` over the unit vectors of the last block.
    """
    generator = torch.Generator(device="cpu").manual_seed(0)
    rows = torch.randn(probes, side.shape[1], generator=generator, dtype=torch.float64).to(side.device)
    exact_gram = gram.double()
    norm = 0.0
    for _ in range(steps):
        rows = torch.linalg.qr(rows.T).Q.T  # (probes, short), orthonormal rows
        # Row form (block on the left): MKL streams the big matrix ~4x faster than ``side.T @ block``.
        error = rows @ exact_gram - (rows @ side.T) @ side  # (probes, short) = (E z)ᵀ, E symmetric
        norm = float(torch.linalg.vector_norm(error, dim=1).max())
        rows = error
    return norm


def _gram_rayleigh_ritz(
    matrix: torch.Tensor, rank: int, gram_dtype: torch.dtype, block: int
) -> tuple[torch.Tensor | None, float, float]:
    """Top-``rank`` right singular vectors via a Gram eigenbasis refined by Rayleigh-Ritz in float64.

    1. ``G`` = Gram matrix of the smaller side (``WᵀW`` if tall, ``WWᵀ`` if wide) in ``gram_dtype``;
       ``eigh(G)`` gives a basis of its top ``block`` (> ``rank``) eigenvectors.
    2. Rayleigh-Ritz on ``W`` itself in float64: the singular vectors of ``W`` restricted to that
       basis. This removes the squaring of the condition number inside the block, so the result is
       as accurate as the block contains the true top-``rank`` subspace.
    3. How far that basis may miss the true top-``rank`` subspace (the containment error) is bounded
       by ``‖R‖ / (λ_rank − λ_{block+1})`` where ``R = G_exact V − V Λ`` is the basis residual against
       the exact Gram (Davis-Kahan). ``‖R‖ ≤ ‖fl(G) V − V Λ‖₂ + ‖fl(G) − G_exact‖₂``: the first term
       is computed in float64, the second is estimated by 3 steps of block power iteration on
       ``fl(G) − WᵀW`` (products with ``W`` in float64), times a safety factor 2.
       The bound is returned with the error a float32 SVD makes at this cut,
       ``eps32 · σ_1 / (σ_rank − σ_{rank+1})``.

    Args:
        matrix: ``(out_features, in_features)``.
        rank: number of vectors wanted.
        gram_dtype: dtype of the Gram matrix and its eigensolver.
        block: size of the eigenbasis, ``rank < block < min(out_features, in_features)``.

    Returns:
        ``(rows, bound, svd_error)``: ``(rank, in_features)`` float64 rows (None if the top ``rank``
        Gram eigenvalues are not above its rounding error), the containment bound, the float32-SVD
        error estimate.
    """
    out_features, in_features = matrix.shape
    tall = in_features <= out_features
    exact = matrix.double()  # (out, in)
    side = matrix.to(gram_dtype)
    side = side if tall else side.T  # (long, short)
    gram = _gram(side)  # (short, short)
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)  # ascending
    eigenvalues = eigenvalues.flip(0).double()  # (short,) descending
    top_vectors = eigenvectors[:, -block:].flip(-1).double()  # (short, block)
    residual = gram.double() @ top_vectors - top_vectors * eigenvalues[:block]  # (short, block)
    eigen_residual = torch.linalg.eigvalsh(residual.T @ residual)[-1].clamp_min(0).sqrt()  # ‖residual‖₂
    noise = float(eigen_residual) + 2.0 * _gram_error_norm(gram, exact if tall else exact.T)
    separation = float(eigenvalues[rank - 1] - eigenvalues[block].clamp_min(0))
    bound = noise / separation if separation > 0 else float("inf")
    singular = eigenvalues.clamp_min(0).sqrt()  # (short,)
    cut_gap = float(singular[rank - 1] - singular[rank])
    svd_error = torch.finfo(torch.float32).eps * float(singular[0]) / cut_gap if cut_gap > 0 else float("inf")
    if separation <= 0 or float(eigenvalues[rank - 1]) <= noise:
        return None, bound, svd_error
    basis = torch.linalg.qr(top_vectors).Q  # (short, block)
    return _rayleigh_ritz(exact, basis, rank), bound, svd_error


def _rayleigh_ritz(exact: torch.Tensor, basis: torch.Tensor | None, rank: int) -> torch.Tensor | None:
    """Top-``rank`` right singular vectors of ``exact`` restricted to ``basis``, all in float64.

    Args:
        exact: ``(out, in)`` float64 weight.
        basis: ``(short, block)`` orthonormal basis of the smaller side's space (input space if tall,
            output space if wide), or None for the whole space.
        rank: number of vectors.

    Returns:
        ``(rank, in)`` float64 orthonormal rows, or None if ``σ_rank² ≤ 1e-12 σ_1²`` (too small to
        recover through the float64 Gram of the restricted matrix).
    """
    out_features, in_features = exact.shape
    if in_features <= out_features:
        projected = exact if basis is None else (basis.T @ exact.T).T  # (out, block): W on the input basis
        values, ritz = torch.linalg.eigh(projected.T @ projected)  # (block,), (block, block) ascending
        top = ritz[:, -rank:].flip(-1)  # (block, rank)
        top = (top if basis is None else basis @ top).T  # (rank, in)
    else:
        projected = exact if basis is None else basis.T @ exact  # (block, in): U_blockᵀ W
        values, ritz = torch.linalg.eigh(projected @ projected.T)  # left Ritz vectors, ascending
        top = ritz[:, -rank:].flip(-1).T @ projected  # (rank, in) = diag(σ) Vh
        top = torch.linalg.qr(top.T).Q.T  # (rank, in): unit rows, same nested spans in order
    if not float(values[-rank]) > 1e-12 * float(values[-1]):
        return None
    return top


LEAK_TOLERANCE = 1e-5
"""Davis-Kahan bound on how far the Gram eigenbasis may miss the top subspace that is always
accepted; a larger bound is accepted only up to the error a float32 SVD makes on the same matrix."""


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Set torch's (process-wide) intra-op thread count inside the block, restore it after.

    The one thread guard of the package: the projector runs each matrix on one thread with it, and
    the many-matrix pool holds it around its workers. A run's own thread count is the recipe/CLI
    ``threads`` option, set once by the ``pica`` command.

    Args:
        count: intra-op threads inside the block (``torch.set_num_threads``).
    """
    previous = torch.get_num_threads()
    if previous != count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if previous != count:
            torch.set_num_threads(previous)


def top_right_singular_vectors(
    weight: torch.Tensor,
    rank: int,
    compute_dtype: torch.dtype = torch.float32,
    oversample: int | None = None,
) -> torch.Tensor:
    """Exact top-``rank`` right singular vectors of ``weight``, sign-canonicalised, without a full SVD.

    Route (see :func:`_gram_rayleigh_ritz`): eigenbasis of the smaller Gram matrix in
    ``compute_dtype``, then Rayleigh-Ritz on ``W`` in float64. If the a-priori bound on how far that
    eigenbasis may miss the true top subspace exceeds both :data:`LEAK_TOLERANCE` and the error
    estimate of a float32 SVD at this cut (small singular values at the cut relative to the Gram's
    rounding error, e.g. steeply decaying spectra), the Gram is recomputed in
    float64; if it still fails (numerically rank-deficient ``W``), a thin float64 SVD is used. Each
    fallback is logged. If ``rank + oversample`` covers the smaller side, Rayleigh-Ritz on the whole
    space (the float64 Gram of ``W``) is the answer.

    Args:
        weight: ``(out_features, in_features)`` weight in PyTorch layout, any float dtype/device.
        rank: number of singular vectors, ``1 ≤ rank ≤ min(out_features, in_features)``.
        compute_dtype: ``torch.float32`` or ``torch.float64``: precision of the Gram matrix (the
            refinement is always float64); also the returned dtype.
        oversample: extra basis vectors beyond ``rank`` (default ``max(32, rank // 4)``).

    Returns:
        ``(rank, in_features)`` tensor in ``compute_dtype`` on ``weight.device``, orthonormal rows.

    Raises:
        ValueError: on a bad rank, dtype or non-finite weight.

    On the CPU the computation runs on one intra-op thread (restored after): the result is then
    bitwise the same whatever ``torch.get_num_threads()`` is, and the dense symmetric eigensolver,
    whose many thread barriers stall badly when another process shares the cores, runs at full speed.
    Use :func:`pica.projector_batch.top_right_singular_vectors_many` to spread many matrices over the cores.
    """
    if weight.device.type == "cpu" and torch.get_num_threads() != 1:
        with torch_threads(1):
            return top_right_singular_vectors(weight, rank, compute_dtype, oversample)
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= min(out_features, in_features):
        raise ValueError(f"rank must be an int in [1, {min(out_features, in_features)}] for a weight of shape "
                         f"{tuple(weight.shape)}, got {rank!r}")
    if compute_dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"compute_dtype must be float32 or float64, got {compute_dtype}")
    matrix = weight.detach()
    if not torch.isfinite(matrix).all():
        raise ValueError("weight has non-finite entries; cannot compute its singular vectors")
    block = min(out_features, in_features, rank + (max(32, rank // 4) if oversample is None else oversample))
    top = None
    if block >= min(out_features, in_features):  # the basis is the whole smaller side: Rayleigh-Ritz is exact
        top = _rayleigh_ritz(matrix.double(), None, rank)
        if top is None:
            logger.info("projector of %s at rank %d: singular values at the cut below 1e-6 σ_1; using a thin SVD",
                        tuple(weight.shape), rank)
    else:
        for gram_dtype in dict.fromkeys((compute_dtype, torch.float64)):
            top, bound, svd_error = _gram_rayleigh_ritz(matrix, rank, gram_dtype, block)
            tolerance = max(LEAK_TOLERANCE, svd_error)
            if top is not None and bound <= tolerance:
                break
            logger.info("projector of %s at rank %d: %s Gram basis may miss the top subspace by %.2g > %.2g; %s",
                        tuple(weight.shape), rank, str(gram_dtype).removeprefix("torch."), bound, tolerance,
                        "retrying in float64" if gram_dtype != torch.float64 else "using a thin SVD")
            top = None
    if top is None:
        top = torch.linalg.svd(matrix.double(), full_matrices=False).Vh[:rank]  # (rank, in)
    return canonicalize_signs(top.to(compute_dtype).contiguous())
