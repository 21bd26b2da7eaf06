"""What a PiCa adapter file holds, and how its keys map to the model's (the save side, and the key
mapping the load path uses).

File keys (peft removes the adapter name; ``<key>`` is the group with ``/`` for ``.``, e.g.
``model/layers/*/self_attn/q_proj``, or the module path for ``share_across_layers=False``)::

    base_model.pica_M.<key>                     (out_features, rank)   once per group
    base_model.model.<layer>.pica_fingerprint   (9,) float64           per layer
    base_model.model.<layer>.pica_P             (rank, in_features)    per layer, projector_storage="full"
    base_model.model.<layer>.pica_sketch        (rank, SKETCH_SIZE)    per layer, projector_storage="compact"

Model keys add the adapter name: ``base_model.pica_M.<adapter>.<key>``, ``<layer>.pica_P.<adapter>``.
pica 0.1.0 stored each ``M`` under one member layer, ``base_model.model.<layer>.pica_M``; such keys
are translated to their group's key on load. peft saves a ``modules_to_save`` head under the plain
module's keys (``base_model.model.classifier.weight``) and renames each, on load, to the wrapper's key for
the adapter (``...classifier.modules_to_save.<adapter>.weight``) before the tuner's remap hook sees it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from peft import PeftModel
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn

from ..grouping import group_of, update_key
from ..sketch import projector_sketch
from .layer import pica_layers

__all__ = ["UPDATE_PREFIX", "AuxiliaryTensor", "auxiliary_tensors", "select_for_save", "state_dict_module_name",
           "to_model_keys"]

UPDATE_PREFIX = "base_model.pica_M."
_LEGACY_UPDATE = re.compile(r"(?:base_model\.model\.)?(?P<layer>.+)\.pica_M")
_LAYER_TENSOR = re.compile(r"(?P<layer>.+)\.(?P<tensor>pica_P|pica_fingerprint)")


def state_dict_module_name(name: str) -> str:
    """A module name as state-dict keys spell it (FSDP1 wrapper segments removed)."""
    return name.replace("_fsdp_wrapped_module.", "")


def select_for_save(model: nn.Module, config, adapter_name: str, state_dict: dict[str, torch.Tensor]
                    ) -> dict[str, torch.Tensor]:
    """The tensors of one adapter to save, under model keys (peft then removes the adapter name).

    Args:
        model: the ``PeftModel`` (FSDP-wrapped or not).
        config: the adapter's ``PiCaConfig``.
        adapter_name: adapter to save.
        state_dict: the model's state dict (peft's, possibly gathered by FSDP).

    Raises:
        ValueError: ``state_dict`` lacks a tensor of the adapter.
    """
    prefix = f"{UPDATE_PREFIX}{adapter_name}."
    selected = {key: value for key, value in state_dict.items() if key.startswith(prefix) and "." not in key[len(prefix):]}
    wanted = ["pica_fingerprint"] + (["pica_P"] if config.projector_storage == "full" else [])
    for name, layer in pica_layers(model, adapter_name):
        name = state_dict_module_name(name)
        for tensor in wanted:
            key = f"{name}.{tensor}.{adapter_name}"
            if key not in state_dict:
                raise ValueError(f"PiCa adapter '{adapter_name}': the state dict has no {key}")
            tensor = state_dict[key]  # a P shared with a wider adapter's is a view: the file gets its own rows
            shared = not tensor.is_meta and tensor.untyped_storage().nbytes() > tensor.numel() * tensor.element_size()
            selected[key] = tensor.clone() if shared else tensor
        if config.projector_storage == "compact":
            selected[f"{name}.pica_sketch.{adapter_name}"] = projector_sketch(layer.pica_P[adapter_name])
    return selected


def to_model_keys(model: nn.Module, config, adapter_name: str, state_dict: dict[str, torch.Tensor]
                  ) -> dict[str, torch.Tensor]:
    """Map the keys of an adapter file to model keys (sketches keep their file keys: they are consumed
    by the load checks, not loaded).

    Raises:
        ValueError: two tensors of the file map to the same ``M`` (an older file with a duplicated group).
    """
    result: dict[str, torch.Tensor] = {}
    live = {layer.pica_group[adapter_name] for _, layer in pica_layers(model, adapter_name)}
    for key, value in state_dict.items():
        if key.startswith(UPDATE_PREFIX) and "." not in key[len(UPDATE_PREFIX):]:
            target = f"{UPDATE_PREFIX}{adapter_name}.{_live_group(key[len(UPDATE_PREFIX):], live)}"
        elif legacy := _LEGACY_UPDATE.fullmatch(key):
            group = update_key(group_of(state_dict_module_name(legacy["layer"]), config.share_across_layers))
            target = f"{UPDATE_PREFIX}{adapter_name}.{_live_group(group, live)}"
        elif _LAYER_TENSOR.fullmatch(key):
            target = f"{key}.{adapter_name}"
        else:
            target = key
        if target in result:
            raise ValueError(f"the adapter file holds two tensors for {target}: {key} and another")
        result[target] = value
    return result


def _live_group(group: str, live: set[str]) -> str:
    """The model's group for a file's ``M`` key: itself, or the one group that pica 0.1's roles (every number
    wildcarded) named so (``blocks/*/ff/*`` for a role now named ``blocks/*/ff/0``).

    Raises:
        ValueError: the key names several of the model's groups: pica 0.1 merged roles into one ``M``.
    """
    if group in live or not live:
        return group
    merged = sorted(g for g in live if "/".join("*" if part.isdecimal() else part for part in g.split("/")) == group)
    if len(merged) > 1:
        raise ValueError(f"the file's M '{group}' was trained as one M shared by {merged}: pica 0.1 merged positions "
                         "in a module list (e.g. ff.0 and ff.2 of an nn.Sequential MLP) into one role, which pica now "
                         "trains as separate roles; this adapter cannot be loaded with its meaning. Train it again")
    return merged[0] if merged else group


@dataclass(frozen=True)
class AuxiliaryTensor:
    """One tensor that a peft auxiliary wrapper (a ``modules_to_save`` head) loads for an adapter.

    Attributes:
        file_key: its key in an adapter file (``base_model.model.<module>.<tensor>``).
        model_key: its key after peft's renaming (``...<module>.modules_to_save.<adapter>.<tensor>``).
        target: the live tensor it is loaded into (its shape and dtype are what the file must fit).
    """

    file_key: str
    model_key: str
    target: torch.Tensor


def auxiliary_tensors(model: nn.Module, adapter_name: str) -> list[AuxiliaryTensor]:
    """Every tensor that peft's auxiliary wrappers in ``model`` load for ``adapter_name`` (from each wrapper's
    ``adapter_state_dict_load_map``). ``model``: a ``PeftModel``, or the base model one is being built around."""
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
