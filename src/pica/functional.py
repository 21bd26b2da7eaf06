"""The PiCa linear op in plain torch (no ``peft``/``transformers`` imports).

For a layer with frozen base weight ``W0 (out×in)``, frozen projector ``P (rank×in)`` and trainable
``M (out×rank)``::

    y = W0 x + M (P x)            (per token)
    W = W0 + M P                  (effective weight)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["delta_weight", "pica_delta"]


def pica_delta(x: torch.Tensor, projector: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """The PiCa term ``(x Pᵀ) Mᵀ`` added to the base layer's output.

    ``x`` is cast to ``update``'s dtype (fp32 by default) so that the adapter computes in the
    adapter's precision whatever the model dtype; the caller casts the result back.

    Args:
        x: ``(..., in_features)`` input activations.
        projector: ``(rank, in_features)`` frozen right singular vectors ``P``.
        update: ``(out_features, rank)`` trainable ``M``.

    Returns:
        ``(..., out_features)`` tensor in ``update.dtype``.
    """
    x = x.to(update.dtype)
    coordinates = F.linear(x, projector.to(update.dtype))  # (..., rank)
    return F.linear(coordinates, update)  # (..., out_features)


def delta_weight(projector: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """The weight update ``ΔW = M P``.

    Args:
        projector: ``(rank, in_features)`` ``P``.
        update: ``(out_features, rank)`` ``M``.

    Returns:
        ``(out_features, in_features)`` tensor in ``update.dtype``.
    """
    return update @ projector.to(update.dtype)  # (out_features, in_features)
