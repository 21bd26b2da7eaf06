"""Collect ``(W0, W)`` weight pairs from two models or from a model with an adapter of any PEFT method."""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..naming import parse_module_path
from ..base_weights import base_weight_out_in

__all__ = ["adapted_weights", "linear_weights", "weight_pairs"]


def linear_weights(model: nn.Module, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Weights of ``nn.Linear`` / ``Conv1D`` modules in ``(out, in)`` layout, detached.

    Args:
        model: a plain (non-wrapped) model.
        names: exact module paths to keep; default: every linear module inside a numbered layer
            (a path with a numeric component, e.g. ``encoder.layer.3.attention.self.query``), i.e. the
            transformer blocks without embeddings, poolers and task heads.

    Returns:
        module path → ``(out, in)`` tensor (a view of the model's weight; de-quantised for bitsandbytes layers).
    """
    wanted = set(names) if names is not None else None
    result = {}
    for name, module in model.named_modules():
        if wanted is not None and name not in wanted:
            continue
        if wanted is None and not parse_module_path(name).indices:
            continue
        if isinstance(module, (Conv1D, nn.Linear)):  # bitsandbytes layers are nn.Linear: read their values, not codes
            result[name] = base_weight_out_in(module).detach()
    if wanted is not None and wanted - set(result):
        raise ValueError(f"not linear modules of the model: {sorted(wanted - set(result))[:6]}")
    return result


def adapted_weights(model: nn.Module) -> nn.Module:
    """A plain copy of a PEFT model with its active adapter merged (any method: PiCa, LoRA, DoRA, VeRA, ...).

    The given model is not modified. Plain models are returned as they are.
    """
    if not hasattr(model, "merge_and_unload"):
        return model
    return copy.deepcopy(model).merge_and_unload()


def weight_pairs(
    base: nn.Module, tuned: nn.Module, names: Iterable[str] | None = None
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``(W0, W)`` per module, for modules present with the same shape in both models.

    Args:
        base: the pre-trained model.
        tuned: the fine-tuned model, plain or a PEFT model (merged into a copy first).
        names: module paths to compare (see :func:`linear_weights` for the default).

    Returns:
        module path → ``(W0, W)``, both ``(out, in)``.

    Raises:
        ValueError: no module in common.
    """
    base_weights = linear_weights(base, names)
    tuned_weights = linear_weights(adapted_weights(tuned), names)
    pairs = {
        name: (weight, tuned_weights[name])
        for name, weight in base_weights.items()
        if name in tuned_weights and tuned_weights[name].shape == weight.shape
    }
    if not pairs:
        raise ValueError("the base and fine-tuned models have no linear module in common (same path and shape)")
    return pairs
