"""The random-subspace ablation: a random orthonormal ``P`` in place of the top singular vectors (pure torch)."""

from __future__ import annotations

import hashlib

import torch

from .projector import canonicalize_signs

__all__ = ["random_orthonormal_rows"]


def random_orthonormal_rows(name: str, rank: int, in_features: int, seed: int) -> torch.Tensor:
    """A random ``P`` with orthonormal rows, a deterministic function of ``(seed, name)``.

    Drawn on the CPU in float64 (Gaussian, then QR), so it is the same on every machine and at every
    load; signs canonicalised like the top subspace. Used by ``PiCaConfig(subspace="random")``.

    Returns:
        ``(rank, in_features)`` float32 tensor on the CPU.
    """
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    gaussian = torch.randn(in_features, rank, generator=generator, dtype=torch.float64)  # (in, rank)
    basis, _ = torch.linalg.qr(gaussian)  # (in, rank), orthonormal columns
    return canonicalize_signs(basis.T.contiguous()).float()  # (rank, in_features)
