"""Which form a PiCa layer computes ``W0 x + M P x`` in: factored, or through the merged weight.

The merged forms (:func:`pica.functional.merged_pica_linear`) compute ``x (W0 + M P)ᵀ + b`` in one
product; they are used only where that is exactly what ``base_layer(x) + (x Pᵀ) Mᵀ`` computes.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..functional import cheaper_form

__all__ = ["FORWARD_MODES", "is_plain_base", "use_merged_form"]

FORWARD_MODES = ("auto", "factored", "merged", "merged_keep")
"""How a layer computes ``W0 x + M P x`` (see :meth:`pica.tuner.layer.Linear.forward`)."""


def is_plain_base(base: nn.Module) -> bool:
    """Whether ``base`` is exactly ``nn.Linear``/``Conv1D`` with a plain weight and no hooks, so that
    computing ``x (W0 + M P)ᵀ + b`` ourselves is the same as calling it."""
    hooks = (base._forward_hooks, base._forward_pre_hooks, nn.modules.module._global_forward_hooks,
             nn.modules.module._global_forward_pre_hooks)
    return (
        type(base) in (nn.Linear, Conv1D)
        and type(base.weight) in (nn.Parameter, torch.Tensor)
        and not any(hooks)
        and "forward" not in vars(base)  # accelerate-style instance-level forward wrappers
    )


def _transformed() -> bool:
    """Whether a ``torch.func`` transform (grad, vmap, jvp, ...) or forward-mode AD is active: the merged form's
    autograd op has no rules for them, the factored form is plain torch ops and supports them all."""
    return torch._C._are_functorch_transforms_active() or torch.autograd.forward_ad._current_level >= 0


def use_merged_form(mode: str, x: torch.Tensor, base: nn.Module, update: torch.Tensor, projector: torch.Tensor,
                    extra_arguments: bool = False) -> bool:
    """Decide the form of one call from the layer's ``forward_mode`` and the shapes.

    The merged form is used only when exact: a plain base layer (no quantised weight, no hooks), no
    extra call arguments, no autocast, no ``torch.func`` transform or forward-mode AD (the factored form
    serves those), and ``x``, ``W0``, ``P``, ``M`` all in one dtype and device
    (so ``W0 + M P`` loses nothing to rounding, e.g. not for a bf16 base with an fp32 ``M``). In
    ``"auto"`` mode it is used when it needs fewer FLOPs (see :func:`pica.functional.cheaper_form`).

    Args:
        mode: one of :data:`FORWARD_MODES`.
        x: ``(..., in_features)`` input of this call.
        base: the base layer.
        update: ``M``, ``(out_features, rank)``.
        projector: ``P``, ``(rank, in_features)``.
        extra_arguments: the call passes arguments besides ``x`` to the base layer.

    Returns:
        True for the merged form, False for the factored one.
    """
    if mode == "factored" or extra_arguments:
        return False
    weight = base.weight
    if not (x.dtype == weight.dtype == update.dtype == projector.dtype
            and x.device == weight.device == update.device == projector.device):
        return False
    if torch.is_autocast_enabled(x.device.type) or not is_plain_base(base) or _transformed():
        return False
    if mode != "auto":
        return True
    rank, in_features = projector.shape
    grad = torch.is_grad_enabled()
    tokens = x.numel() // max(in_features, 1)
    return cheaper_form(tokens, in_features, update.shape[0], rank,
                        input_grad=grad and x.requires_grad, update_grad=grad and update.requires_grad) == "merged"
