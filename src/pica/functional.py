"""The PiCa linear op in plain torch (no ``peft``/``transformers`` imports).

For a layer with frozen base weight ``W0 (out×in)``, frozen projector ``P (rank×in)`` and trainable
``M (out×rank)``::

    y = W0 x + M (P x)            (per token)
    W = W0 + M P                  (effective weight)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F

__all__ = ["add_mixed_pica_terms", "cheaper_form", "delta_weight", "merged_pica_linear", "pica_coordinates",
           "pica_delta"]


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
    return F.linear(pica_coordinates(x, projector, update.dtype), update)  # (..., out_features)


def pica_coordinates(x: torch.Tensor, projector: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x Pᵀ``, the coordinates of ``x`` in ``P``'s subspace, computed in ``dtype`` (the adapter's).

    Args:
        x: ``(..., in_features)`` input activations.
        projector: ``(r, in_features)`` ``P`` (or its leading rows).
        dtype: compute dtype, ``M``'s.

    Returns:
        ``(..., r)`` tensor in ``dtype``.
    """
    return F.linear(x.to(dtype), projector.to(dtype))


def add_mixed_pica_terms(result: torch.Tensor, x: torch.Tensor, row_adapters: Sequence[str],
                         terms: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Add to row ``i`` of ``result`` the PiCa term of adapter ``row_adapters[i]`` (none if it is not in ``terms``).

    Adapters whose ``P`` are views of one storage (their ``M`` in one dtype) are projected once, at the widest
    rank (the others hold its leading rows); each ``M`` then applies to its own rows only.

    Args:
        result: ``(batch, ..., out_features)``, updated in place.
        x: ``(batch, ..., in_features)``.
        row_adapters: one adapter name per row.
        terms: adapter name → (``P (rank, in_features)``, ``M (out_features, rank)``).
    """
    groups: dict[tuple, list[str]] = {}  # (P storage, M dtype) -> adapters, each once, in order of first use
    for name in dict.fromkeys(row_adapters):
        if name in terms:
            projector, update = terms[name]
            storage = name if projector.is_meta else projector.untyped_storage().data_ptr()
            groups.setdefault((storage, update.dtype), []).append(name)
    for (_, dtype), names in groups.items():
        members = set(names)
        rows = [i for i, row in enumerate(row_adapters) if row in members]
        widest = max(names, key=lambda name: terms[name][0].shape[0])
        x_rows = x if len(rows) == x.shape[0] else x.index_select(0, torch.tensor(rows, device=x.device))
        coordinates = pica_coordinates(x_rows, terms[widest][0], dtype)  # (len(rows), ..., widest rank)
        for name in names:
            projector, update = terms[name]
            picked = [k for k, i in enumerate(rows) if row_adapters[i] == name]
            own = coordinates.index_select(0, torch.tensor(picked, device=x.device))[..., : projector.shape[0]]
            delta = F.linear(own, update)  # (len(picked), ..., out_features)
            result.index_add_(0, torch.tensor([rows[k] for k in picked], device=x.device), delta.to(result.dtype))


def delta_weight(projector: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """The weight update ``ΔW = M P``.

    Args:
        projector: ``(rank, in_features)`` ``P``.
        update: ``(out_features, rank)`` ``M``.

    Returns:
        ``(out_features, in_features)`` tensor in ``update.dtype``.
    """
    return update @ projector.to(update.dtype)  # (out_features, in_features)


def _flops(tokens: int, in_features: int, out_features: int, rank: int, input_grad: bool, update_grad: bool,
           form: str) -> int:
    """Multiply-adds (×2) that a form spends beyond the plain base layer for one forward + backward."""
    if form == "factored":
        total = 2 * tokens * rank * (in_features + out_features)  # x Pᵀ, then (x Pᵀ) Mᵀ
        total += 2 * tokens * out_features * rank if update_grad else 0  # gᵀ (x Pᵀ)
        total += 2 * tokens * rank * (in_features + out_features) if input_grad else 0  # (g M) P
        return total
    total = 2 * out_features * in_features * rank  # W0 + M P in forward
    total += 2 * tokens * rank * (in_features + out_features) if update_grad else 0  # x Pᵀ, gᵀ (x Pᵀ)
    if input_grad:
        total += 2 * out_features * in_features * rank  # W0 + M P again in backward
    return total


def cheaper_form(
    tokens: int, in_features: int, out_features: int, rank: int, input_grad: bool, update_grad: bool,
) -> Literal["factored", "merged"]:
    """The form of the PiCa layer with fewer FLOPs for these shapes.

    Extra FLOPs over the frozen base (``N`` tokens, ``d = in = out``, both gradients): factored
    ``10 N d r`` (≈ 2.5 r/d of the base), merged ``4 d² r + 4 N d r`` (≈ r/d + r/N). Small ``N``
    favours the factored form.

    Args:
        tokens: number of rows of ``x`` (batch × sequence).
        in_features: ``in``.
        out_features: ``out``.
        rank: ``rank``.
        input_grad: whether ``∂L/∂x`` is needed.
        update_grad: whether ``∂L/∂M`` is needed.

    Returns:
        ``"factored"`` or ``"merged"``.
    """
    args = (tokens, in_features, out_features, rank, input_grad, update_grad)
    return "merged" if _flops(*args, form="merged") < _flops(*args, form="factored") else "factored"


class _MergedPiCaLinear(torch.autograd.Function):
    """``y = x (W0 + M P)ᵀ + b`` saving only ``x Pᵀ`` for backward.

    ``weight`` is in storage layout: ``(out, in)`` for ``nn.Linear``, ``(in, out)`` if ``in_out``
    (transformers ``Conv1D``, whose op ``addmm(b, x, W)`` is reproduced bit for bit when ``M = 0``).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, projector, update, in_out: bool):  # type: ignore[override]
        x_grad, weight_grad, bias_grad, _, update_grad = ctx.needs_input_grad[:5]
        if in_out:
            merged = torch.addmm(weight, projector.T, update.T)  # (in, out)
            flat = x.reshape(-1, x.shape[-1])  # (N, in)
            out = (torch.addmm(bias, flat, merged) if bias is not None else flat @ merged).view(*x.shape[:-1], -1)
        else:
            merged = torch.addmm(weight, update, projector)  # (out, in)
            out = F.linear(x, merged, bias)  # (..., out)
        coordinates = F.linear(x, projector) if update_grad else None  # (..., rank)
        ctx.save_for_backward(coordinates, weight, projector, update, x if weight_grad else None)
        ctx.in_out = in_out
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        if torch.is_grad_enabled():  # create_graph=True: x Pᵀ is saved as a constant, so a second derivative would be wrong
            raise RuntimeError(
                "PiCa's merged forward form (PiCaConfig.forward_mode 'auto' picks it for large inputs) supports "
                "first-order gradients only; for higher-order gradients (create_graph=True, "
                "double backward, Hessian-vector products) use PiCaConfig(forward_mode='factored')")
        coordinates, weight, projector, update, x = ctx.saved_tensors
        x_grad, weight_grad, bias_grad, _, update_grad = ctx.needs_input_grad[:5]
        flat_grad = grad_out.reshape(-1, grad_out.shape[-1])  # (N, out)
        grad_x = grad_weight = grad_bias = grad_update = None
        if x_grad:
            if ctx.in_out:
                merged = torch.addmm(weight, projector.T, update.T)  # (in, out)
                grad_x = grad_out @ merged.T  # (..., in)
            else:
                merged = torch.addmm(weight, update, projector)  # (out, in)
                grad_x = grad_out @ merged  # (..., in)
        if update_grad:
            grad_update = flat_grad.T @ coordinates.reshape(-1, coordinates.shape[-1])  # (out, rank)
        if weight_grad:
            flat_x = x.reshape(-1, x.shape[-1])  # (N, in)
            grad_weight = flat_x.T @ flat_grad if ctx.in_out else flat_grad.T @ flat_x
        if bias_grad and ctx.has_bias:
            grad_bias = flat_grad.sum(0)  # (out,)
        return grad_x, grad_weight, grad_bias, None, grad_update, None


def merged_pica_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    projector: torch.Tensor,
    update: torch.Tensor,
    in_out: bool = False,
) -> torch.Tensor:
    """The whole PiCa layer ``x (W0 + M P)ᵀ + b`` through the merged weight, with a lean backward.

    Forward builds ``W0 + M P`` (a transient ``out×in`` tensor) and multiplies once. Backward needs
    only ``x Pᵀ`` (``N×rank``, for ``∂L/∂M = gᵀ (x Pᵀ)``) and rebuilds ``W0 + M P`` for
    ``∂L/∂x = g (W0 + M P)``. ``x`` is saved only if the base weight itself requires a gradient.
    All tensors must share one dtype and device.

    Args:
        x: ``(..., in_features)``.
        weight: base weight, ``(out_features, in_features)``, or ``(in_features, out_features)`` if ``in_out``.
        bias: ``(out_features,)`` or None.
        projector: ``(rank, in_features)`` frozen ``P``.
        update: ``(out_features, rank)`` ``M``.
        in_out: ``weight`` is stored ``(in, out)`` (transformers ``Conv1D``).

    Returns:
        ``(..., out_features)``.
    """
    return _MergedPiCaLinear.apply(x, weight, bias, projector, update, in_out)
