"""Compact projector storage: a small sketch of each ``P`` instead of ``P`` itself (pure torch).

``P (rank×in)`` is most of a PiCa adapter's size (Gemma-2B, rank 256: 113M values for ``P`` vs
5.37M for ``M``). In compact storage the file keeps, per layer, only the sketch ``S = P Ωᵀ``
(``rank × SKETCH_SIZE``), with ``Ω`` a fixed-seed Gaussian ``(SKETCH_SIZE × in)`` regenerated at
load. At load ``P`` is recomputed from the base weight with the fast exact projector, then aligned
to the sketch: singular vectors are unique only up to sign, and up to rotation inside groups of
(near-)equal singular values, so the recomputed rows are mapped by an orthogonal block-diagonal
``Q`` (one block per such group; orthogonal Procrustes on the sketches, a sign for 1×1 blocks).
If the aligned ``P`` still misses the sketch by more than ``SKETCH_TOLERANCE`` in some row (another
base, another precision, a spectrum too flat at the cut to reproduce), loading is refused.

The sketch estimates row errors: for unit-norm ``e``, ``‖Ω e‖`` is ``‖e‖`` within a factor
``1 ± ~0.25`` at ``SKETCH_SIZE = 32`` (Johnson-Lindenstrauss), so a residual below the tolerance
means the aligned rows are that close to the saved ones.
"""

from __future__ import annotations

import torch

__all__ = ["CLUSTER_GAP", "SKETCH_SIZE", "SKETCH_TOLERANCE", "align_to_sketch", "projector_sketch"]

SKETCH_SIZE = 32
"""Columns of the sketch per layer (stored: ``rank × SKETCH_SIZE`` float32 values per layer)."""
SKETCH_TOLERANCE = 1e-3
"""Largest accepted sketch residual of an aligned row (rows of ``P`` have unit norm)."""
CLUSTER_GAP = 1e-4
"""Neighbouring singular values closer than this (relative to ``σ_1``) may be rotated into each other.
A group larger than half the sketch width cannot be aligned reliably and is refused."""
_SKETCH_SEED = 8_2505_211


def _test_matrix(in_features: int, sketch_size: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator(device="cpu").manual_seed(_SKETCH_SEED + in_features)
    omega = torch.randn(sketch_size, in_features, generator=generator, dtype=torch.float64)  # (s, in)
    return (omega / sketch_size**0.5).to(device)


def projector_sketch(projector: torch.Tensor, sketch_size: int = SKETCH_SIZE) -> torch.Tensor:
    """The sketch ``P Ωᵀ`` saved in place of ``P``.

    Args:
        projector: ``(rank, in_features)`` ``P``.
        sketch_size: columns of the sketch.

    Returns:
        ``(rank, sketch_size)`` float32 tensor.
    """
    omega = _test_matrix(projector.shape[1], sketch_size, projector.device)  # (s, in)
    return (projector.double() @ omega.T).float()  # (rank, s)


def _clusters(singular_values: torch.Tensor) -> list[slice]:
    """Runs of consecutive indices whose neighbouring gaps are below ``CLUSTER_GAP · σ_1``."""
    values = singular_values.double().cpu()
    scale = max(float(values[0]), 1e-300)
    runs, start = [], 0
    for index in range(1, len(values)):
        if abs(float(values[index - 1] - values[index])) > CLUSTER_GAP * scale:
            runs.append(slice(start, index))
            start = index
    runs.append(slice(start, len(values)))
    return runs


def align_to_sketch(
    projector: torch.Tensor, weight: torch.Tensor, sketch: torch.Tensor
) -> tuple[torch.Tensor, float]:
    """Align a recomputed ``P`` to a saved sketch and measure how far it still is.

    Args:
        projector: ``(rank, in_features)`` ``P`` recomputed from ``weight``, orthonormal rows.
        weight: ``(out_features, in_features)`` base weight (for the singular values ``‖W pᵢ‖``).
        sketch: ``(rank, s)`` saved sketch.

    Returns:
        ``(aligned, residual)``: ``(rank, in_features)`` aligned ``P`` in ``projector.dtype`` (rows
        still orthonormal), and the largest row norm of ``aligned Ωᵀ − sketch`` (``inf`` on a shape
        mismatch or a group of near-equal singular values too large to align).
    """
    rank, in_features = projector.shape
    if sketch.ndim != 2 or sketch.shape[0] != rank:
        return projector, float("inf")
    omega = _test_matrix(in_features, sketch.shape[1], projector.device)  # (s, in)
    exact = projector.double()  # (rank, in)
    recomputed = exact @ omega.T  # (rank, s)
    saved = sketch.double().to(projector.device)  # (rank, s)
    # σ_i = ‖W p_i‖ only decides which rows may rotate into each other (gaps below 1e-4·σ_1): float32
    # products (error ~1e-6·σ_1) are precise enough and 3x cheaper than float64 on the large matrices.
    singular_values = torch.linalg.vector_norm(weight.detach().float() @ projector.float().T, dim=0)  # (rank,)
    rotation = torch.zeros(rank, rank, dtype=torch.float64, device=projector.device)  # block-diagonal Q
    for run in _clusters(singular_values):
        if run.stop - run.start > sketch.shape[1] // 2:
            return projector, float("inf")
        cross = saved[run] @ recomputed[run].T  # (k, k)
        left, _, right_h = torch.linalg.svd(cross)
        rotation[run, run] = left @ right_h  # argmin_Q ‖Q S_new − S_saved‖ over orthogonal Q
    aligned = rotation @ exact  # (rank, in)
    residual = float(torch.linalg.vector_norm(aligned @ omega.T - saved, dim=1).max())
    return aligned.to(projector.dtype), residual
