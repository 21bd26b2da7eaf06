"""Top-``rank`` right singular vectors of a weight, canonical signs, and weight fingerprints.

This module is pure torch: it imports neither ``peft`` nor ``transformers``.

Conventions (PyTorch layout): a linear weight is ``W0 ∈ R^{out×in}``. The projector of a layer is
``P ∈ R^{rank×in}``, the top-``rank`` rows of ``Vh`` in ``W0 = U diag(S) Vh``, i.e. the principal
directions of the layer's *input* space.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "FINGERPRINT_SIZE",
    "canonicalize_signs",
    "fingerprint_distance",
    "top_right_singular_vectors",
    "weight_fingerprint",
]

_SUPPORTED_DTYPES = (torch.float32, torch.float64)
FINGERPRINT_SIZE = 9
"""Length of :func:`weight_fingerprint`: the Frobenius norm and 8 random bilinear probes."""
_FINGERPRINT_SEED = 20_505_211  # arXiv 2505.20211


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


def top_right_singular_vectors(
    weight: torch.Tensor, rank: int, compute_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Exact top-``rank`` right singular vectors of ``weight``, sign-canonicalised.

    Works on the smaller Gram matrix (``WᵀW`` if ``in ≤ out``, else ``WWᵀ``) with a symmetric
    eigensolver, which avoids a full SVD of the larger side. For the wide case the right vectors
    are recovered as ``V_r = diag(1/σ_r) U_rᵀ W``. The Gram matrix squares the condition number, so
    if ``σ_rank/σ_1`` is below ``(10·√eps)^½`` of ``compute_dtype`` (≈0.06 in fp32: fast-decaying
    spectra, rank-deficient weights) it uses a thin SVD of the weight instead, in both orientations,
    and logs it. fp32 and fp64 results then agree to ``~eps32·σ_1/gap`` (tests/test_determinism.py).

    Args:
        weight: ``(out_features, in_features)`` weight in PyTorch layout, any float dtype/device.
        rank: number of singular vectors, ``1 ≤ rank ≤ min(out_features, in_features)``.
        compute_dtype: ``torch.float32`` or ``torch.float64``; the model's dtype is irrelevant.

    Returns:
        ``(rank, in_features)`` tensor in ``compute_dtype`` on ``weight.device``, orthonormal rows.

    Raises:
        ValueError: on a bad rank, dtype or non-finite weight.
    """
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= min(out_features, in_features):
        raise ValueError(f"rank must be an int in [1, {min(out_features, in_features)}] for a weight of shape "
                         f"{tuple(weight.shape)}, got {rank!r}")
    if compute_dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"compute_dtype must be float32 or float64, got {compute_dtype}")
    matrix = weight.detach().to(compute_dtype)  # (out, in)
    if not torch.isfinite(matrix).all():
        raise ValueError("weight has non-finite entries; cannot compute its singular vectors")

    tall = in_features <= out_features
    gram = matrix.T @ matrix if tall else matrix @ matrix.T  # (in, in) if tall else (out, out)
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)  # ascending eigenvalues = squared singular values
    top_values = eigenvalues[-rank:].flip(-1).clamp_min(0)  # (rank,)
    # The Gram matrix squares the condition number: its eigenvectors lose accuracy like
    # eps·σ_1/σ_rank times a thin SVD's. Past that floor (decaying spectra, near rank-deficient
    # weights) a thin SVD of the weight itself is used, in either orientation.
    relative_floor = torch.finfo(compute_dtype).eps ** 0.5 * 10
    if top_values[-1] <= relative_floor * top_values[0]:
        logger.info("weight %s has sigma_%d/sigma_1 <= %.2g; using a thin SVD", tuple(weight.shape), rank,
                    relative_floor**0.5)
        top = torch.linalg.svd(matrix, full_matrices=False).Vh[:rank]  # (rank, in)
    elif tall:
        top = eigenvectors[:, -rank:].flip(-1).T  # (rank, in)
    else:
        left = eigenvectors[:, -rank:].flip(-1)  # (out, rank)
        top = (left.T @ matrix) / top_values.sqrt().unsqueeze(1)  # (rank, in)
        top = torch.linalg.qr(top.T).Q.T  # (rank, in) re-orthonormalised, same row spaces in order
    return canonicalize_signs(top.contiguous())


def _probe_vectors(size: int, count: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator(device="cpu").manual_seed(_FINGERPRINT_SEED + size)
    probes = torch.randn(size, count, generator=generator, dtype=torch.float64)  # (size, count)
    return probes.to(device)


def weight_fingerprint(weight: torch.Tensor) -> torch.Tensor:
    """A small, dtype-robust summary of a weight used to detect loading onto another base.

    Entries: ``‖W‖_F`` and 8 bilinear probes ``u_kᵀ W v_k`` with fixed-seed standard Gaussian
    ``u_k, v_k``, computed in float64. Each probe has standard deviation ``‖W‖_F`` over the probes,
    and moves by about ``‖ΔW‖_F`` when the weight changes by ``ΔW``: rounding to bf16 moves it by
    ~1e-3 of the norm, a different weight of the same shape by O(1).

    Args:
        weight: ``(out_features, in_features)`` weight in PyTorch layout.

    Returns:
        ``(FINGERPRINT_SIZE,)`` float64 tensor on ``weight.device``.
    """
    matrix = weight.detach().to(torch.float64)  # (out, in)
    count = FINGERPRINT_SIZE - 1
    left = _probe_vectors(matrix.shape[0], count, matrix.device)  # (out, count)
    right = _probe_vectors(matrix.shape[1], count, matrix.device)  # (in, count)
    probes = ((left.T @ matrix) * right.T).sum(dim=1)  # (count,)
    return torch.cat([torch.linalg.norm(matrix).reshape(1), probes])


def fingerprint_distance(expected: torch.Tensor, actual: torch.Tensor) -> float:
    """Relative distance between two fingerprints, scaled by the weight norm (0 = identical)."""
    expected = expected.detach().to(torch.float64).cpu()
    actual = actual.detach().to(torch.float64).cpu()
    scale = max(float(expected[0].abs()), float(actual[0].abs()), 1e-30)
    return float((expected - actual).abs().max()) / scale
