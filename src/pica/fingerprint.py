"""Weight fingerprints: a few numbers per base weight, to refuse loading an adapter onto another base (pure torch)."""

from __future__ import annotations

import torch

__all__ = ["FINGERPRINT_SIZE", "FINGERPRINT_TOLERANCE", "fingerprint_distance", "weight_fingerprint"]

FINGERPRINT_SIZE = 9
"""Length of :func:`weight_fingerprint`: the Frobenius norm and 8 random bilinear probes."""
FINGERPRINT_TOLERANCE = 2e-2
"""Largest accepted fingerprint distance (relative to ‖W0‖_F); bf16 rounding gives ~3e-3."""
_FINGERPRINT_SEED = 20_505_211  # arXiv 2505.20211


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
