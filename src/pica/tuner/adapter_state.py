"""An adapter's tensors in the model: what is saved, file keys → model keys, the ``modules_to_save`` heads (the file's
key layout and the checks of each tensor: :mod:`pica.adapter_format`)."""

from __future__ import annotations

import torch
from peft import PeftModel
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn

from ..adapter_format import UPDATE_PREFIX, AuxiliaryTensor, model_keys, state_dict_module_name
from ..sketch import projector_sketch
from .config import PiCaConfig
from .layer import pica_layers

__all__ = ["UPDATE_PREFIX", "AuxiliaryTensor", "auxiliary_tensors", "select_for_save", "state_dict_module_name",
           "to_model_keys"]


def select_for_save(model: nn.Module, config: PiCaConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
                    ) -> dict[str, torch.Tensor]:
    """The tensors of ``adapter_name`` to save, under model keys (peft then removes the adapter name), from the
    ``model``'s ``state_dict`` (possibly gathered by FSDP).

    Raises:
        ValueError: ``state_dict`` lacks a tensor of the adapter.
    """
    prefix = f"{UPDATE_PREFIX}{adapter_name}."
    selected = {key: value for key, value in state_dict.items() if key.startswith(prefix) and "." not in key[len(prefix):]}
    for name, layer in pica_layers(model, adapter_name):
        name = state_dict_module_name(name)
        for leaf in ["pica_fingerprint"] + (["pica_P"] if config.projector_storage == "full" else []):
            if (key := f"{name}.{leaf}.{adapter_name}") not in state_dict:
                raise ValueError(f"PiCa adapter '{adapter_name}': the state dict has no {key}")
            tensor = state_dict[key]  # a P shared with a wider adapter's is a view: the file gets its own rows
            shared = not tensor.is_meta and tensor.untyped_storage().nbytes() > tensor.numel() * tensor.element_size()
            selected[key] = tensor.clone() if shared else tensor
        if config.projector_storage == "compact":
            selected[f"{name}.pica_sketch.{adapter_name}"] = projector_sketch(layer.pica_P[adapter_name])
    return selected


def to_model_keys(model: nn.Module, config: PiCaConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
                  ) -> dict[str, torch.Tensor]:
    """An adapter file's tensors under ``model``'s keys (:func:`pica.adapter_format.model_keys`).

    Raises:
        ValueError: two tensors for one key, or a pica 0.1 ``M`` that stands for several groups.
    """
    groups = {layer.pica_group[adapter_name] for _, layer in pica_layers(model, adapter_name)}
    return model_keys(state_dict, adapter_name, config.share_across_layers, groups)


def auxiliary_tensors(model: nn.Module, adapter_name: str) -> list[AuxiliaryTensor]:
    """Every tensor peft's auxiliary wrappers in ``model`` (a ``PeftModel``, or the base model one is being built
    around) load for ``adapter_name``, from each wrapper's ``adapter_state_dict_load_map``."""
    prefix = "" if isinstance(model, PeftModel) else "base_model.model."
    result = []
    for name, module in model.named_modules():
        if isinstance(module, AuxiliaryTrainingWrapper):
            name = prefix + state_dict_module_name(name)
            for file_leaf, model_leaf in module.adapter_state_dict_load_map(adapter_name).items():
                owner, _, leaf = model_leaf.rpartition(".")
                target = getattr(module.get_submodule(owner) if owner else module, leaf)
                result.append(AuxiliaryTensor(f"{name}.{file_leaf}", f"{name}.{model_leaf}", target))
    return result
