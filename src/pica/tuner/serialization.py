"""Adapter state dict on save and on load (verify against the base, or roll back).

Saved keys (adapter name removed by peft)::

    base_model.model.<group leader>.pica_M        (out_features, rank)   once per group
    base_model.model.<layer>.pica_P               (rank, in_features)    per layer, if store_projector
    base_model.model.<layer>.pica_fingerprint     (9,) float64           per layer

On load ``P`` comes from the file (or, with ``store_projector=False``, from the projector just
computed), and each fingerprint is compared with the fingerprint of the base weight it is being
loaded onto. Any problem raises ``ValueError`` naming the modules, after removing the layers that
were injected for this adapter, so the base model is left as it was.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
from peft.tuners.tuners_utils import _get_submodules
from torch import nn

from . import compact
from .layer import FINGERPRINT_TOLERANCE, PiCaLayer

logger = logging.getLogger(__name__)

__all__ = ["check_for_load", "remove_adapter_layers", "select_for_save"]


def _layers(model: nn.Module, adapter_name: str) -> Iterator[tuple[str, PiCaLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, PiCaLayer) and adapter_name in module.pica_P:
            yield name, module


def _key(module_name: str, attribute: str, adapter_name: str) -> str:
    return f"{module_name}.{attribute}.{adapter_name}" if module_name else f"{attribute}.{adapter_name}"


def select_for_save(
    model: nn.Module, config, adapter_name: str, state_dict: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Drop the projectors from the saved tensors unless ``config.store_projector``; add sketches in
    ``projector_storage="compact"``."""
    if config.store_projector:
        return state_dict
    drop = {_key(name, "pica_P", adapter_name) for name, _ in _layers(model, adapter_name)}
    kept = {key: value for key, value in state_dict.items() if key not in drop}
    if getattr(config, "projector_storage", None) == "compact":
        kept.update(compact.sketches_for_save(dict(_layers(model, adapter_name)), adapter_name, _key))
    return kept


def _model_key(state_dict: dict[str, torch.Tensor], module_name: str, attribute: str, adapter_name: str) -> str:
    key = _key(module_name, attribute, adapter_name)
    if key not in state_dict and key.startswith("base_model.model."):
        short = key.removeprefix("base_model.model.")
        if short in state_dict:
            return short
    return key


def _check_tensor(problems: list[str], name: str, what: str, tensor: torch.Tensor | None, shape: tuple[int, ...]) -> None:
    if tensor is None:
        problems.append(f"{name}: {what} missing")
    elif tuple(tensor.shape) != shape:
        problems.append(f"{name}: {what} has shape {tuple(tensor.shape)}, expected {shape}")
    elif not torch.isfinite(tensor).all():
        problems.append(f"{name}: {what} has non-finite values")


def check_for_load(
    model: nn.Module, config, adapter_name: str, state_dict: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Validate a remapped adapter state dict against the model it is about to be loaded into.

    Args:
        model: the (peft-wrapped) model whose PiCa layers for ``adapter_name`` were just injected.
        config: the adapter's ``PiCaConfig``.
        adapter_name: adapter being loaded.
        state_dict: checkpoint tensors with model keys.

    Returns:
        The state dict, with the freshly computed ``P`` added where the file has none by design.

    Raises:
        ValueError: naming modules with missing/mis-shaped/non-finite tensors or a fingerprint that
            does not match the base weight; the adapter's layers are removed first.
    """
    result = dict(state_dict)
    problems: list[str] = []
    mismatched: list[str] = []
    for name, layer in _layers(model, adapter_name):
        rank, group = layer.rank[adapter_name], layer.pica_group[adapter_name]
        if adapter_name in layer.pica_M:  # the group's leader holds M
            update = state_dict.get(_model_key(state_dict, name, "pica_M", adapter_name))
            _check_tensor(problems, name, f"M of group '{group}'", update, (layer.out_features, rank))
        p_key = _model_key(state_dict, name, "pica_P", adapter_name)
        if getattr(config, "projector_storage", None) == "compact" and p_key not in state_dict:
            compact.load_from_sketch(problems, result, name, layer, adapter_name, p_key,
                                     _model_key(state_dict, name, "pica_sketch", adapter_name))
        elif p_key not in state_dict and not config.store_projector:
            result[p_key] = layer.pica_P[adapter_name]
        else:
            _check_tensor(problems, name, "P", state_dict.get(p_key), (rank, layer.in_features))
        f_key = _model_key(state_dict, name, "pica_fingerprint", adapter_name)
        stored, expected = state_dict.get(f_key), layer.pica_fingerprint[adapter_name]
        _check_tensor(problems, name, "fingerprint", stored, tuple(expected.shape))
        if stored is not None and stored.shape == expected.shape and not expected.is_meta:
            distance = layer.fingerprint_distance(adapter_name, stored)
            if distance > FINGERPRINT_TOLERANCE:
                mismatched.append(f"{name} (distance {distance:.3g})")
    if mismatched:
        problems.insert(  # first: it explains the other problems
            0, f"the adapter was trained on a different base model: base weights differ at {len(mismatched)} "
            f"module(s): {', '.join(mismatched[:6])}"
        )
    if problems:
        remove_adapter_layers(model, adapter_name)
        raise ValueError(f"Cannot load PiCa adapter '{adapter_name}': " + "; ".join(problems[:8]))
    for _, layer in _layers(model, adapter_name):
        layer.projector_loaded(adapter_name)  # every P is now in ``result``, checked
    return result


def remove_adapter_layers(model: nn.Module, adapter_name: str) -> None:
    """Remove ``adapter_name`` from every PiCa layer; layers left without adapters become their base layer."""
    for name, layer in list(_layers(model, adapter_name)):
        layer.delete_adapter(adapter_name)
        if not layer.pica_P:
            parent, _, child_name = _get_submodules(model, name)
            setattr(parent, child_name, layer.get_base_layer())
    for module in model.modules():
        config = getattr(module, "peft_config", None)
        if isinstance(config, dict):
            config.pop(adapter_name, None)
            if not config and "peft_config" in vars(module):  # a plain attribute, not PeftModel's property
                del module.peft_config
