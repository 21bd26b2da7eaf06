"""Per-matrix spectral measures of a fine-tuning update (pure torch, computed in float64).

PyTorch layout throughout: a weight is ``W ∈ R^{out×in}``; ``P ∈ R^{rank×in}`` holds the top-``rank``
right singular vectors of ``W0`` as rows (PiCa's projector).
"""

from __future__ import annotations

import math

import torch

__all__ = ["energy_fraction", "intruder_cosines", "principal_angles", "top_right_subspace"]


def top_right_subspace(weight: torch.Tensor, rank: int) -> torch.Tensor:
    """Orthonormal rows spanning the top-``rank`` right singular subspace of ``weight``.

    Args:
        weight: ``(out, in)``.
        rank: number of directions, ``1 ≤ rank ≤ min(out, in)``.

    Returns:
        ``(rank, in)`` float64 (signs are irrelevant for the measures here).
    """
    if not 1 <= rank <= min(weight.shape):
        raise ValueError(f"rank must be in [1, {min(weight.shape)}] for a {tuple(weight.shape)} weight, got {rank}")
    _, _, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)  # vh: (min(out,in), in)
    return vh[:rank]


def energy_fraction(delta: torch.Tensor, projector: torch.Tensor) -> float:
    """Share of ``‖ΔW‖_F²`` inside the row space of ``P``: ``‖ΔW Pᵀ P‖² / ‖ΔW‖² = ‖ΔW Pᵀ‖² / ‖ΔW‖²``.

    A random ``rank``-dimensional subspace of the input space captures ``rank / in`` on average.

    Args:
        delta: ``ΔW``, ``(out, in)``.
        projector: ``P`` with orthonormal rows, ``(rank, in)``.

    Returns:
        A fraction in ``[0, 1]``; ``nan`` if ``ΔW = 0``.
    """
    delta = delta.detach().double()
    total = delta.square().sum().item()
    if total == 0.0:
        return math.nan
    captured = (delta @ projector.detach().double().T).square().sum().item()  # ‖ΔW Pᵀ‖², (out, rank) inside
    return captured / total


def principal_angles(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Principal angles (degrees, ascending) between the row spaces of two orthonormal-row matrices.

    Args:
        first: ``(rank, in)`` orthonormal rows.
        second: ``(rank2, in)`` orthonormal rows.

    Returns:
        ``(min(rank, rank2),)`` float64 angles in degrees, smallest first.
    """
    cosines = torch.linalg.svdvals(first.detach().double() @ second.detach().double().T)  # descending
    return torch.rad2deg(torch.arccos(cosines.clamp(-1.0, 1.0)))


def intruder_cosines(base: torch.Tensor, tuned: torch.Tensor, top_k: int = 10) -> torch.Tensor:
    """For each of the fine-tuned weight's top-``top_k`` singular vectors, its best match in the base.

    Following Shuttleworth et al. (2024), "LoRA vs Full Fine-tuning: An Illusion of Equivalence": a
    singular vector of the fine-tuned ``W`` is an *intruder dimension* when its largest cosine
    similarity with every singular vector of ``W0`` is below a threshold ``ε``. Left singular vectors
    (the output space, columns of ``U``) are compared, as in that paper.

    Args:
        base: ``W0``, ``(out, in)``.
        tuned: ``W``, ``(out, in)``.
        top_k: how many leading singular vectors of ``W`` to test.

    Returns:
        ``(top_k,)`` float64: ``max_j |⟨u_i(W), u_j(W0)⟩|`` for ``i < top_k`` (count intruders with
        ``(result < ε).sum()``).
    """
    if base.shape != tuned.shape:
        raise ValueError(f"base {tuple(base.shape)} and tuned {tuple(tuned.shape)} weights differ in shape")
    top_k = min(top_k, min(base.shape))
    base_u = torch.linalg.svd(base.detach().double(), full_matrices=False)[0]  # (out, min(out,in))
    tuned_u = torch.linalg.svd(tuned.detach().double(), full_matrices=False)[0][:, :top_k]  # (out, top_k)
    return (tuned_u.T @ base_u).abs().amax(dim=1)  # (top_k,)
