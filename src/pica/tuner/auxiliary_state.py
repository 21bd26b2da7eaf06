"""The tensors of peft's auxiliary wrappers (``modules_to_save`` heads) that an adapter file must hold.

peft saves a ``ModulesToSaveWrapper``'s trained copy under the plain module's keys
(``base_model.model.classifier.weight``) and, on load, renames each to the wrapper's key for the
adapter (``base_model.model.classifier.modules_to_save.<adapter>.weight``) in
``set_peft_model_state_dict``, before the tuner's remap hook sees the state dict. The wrapper's
``adapter_state_dict_load_map`` is the list of keys it needs; this module turns it into
``(file key, model key, live tensor)`` triples for the load checks in :mod:`pica.tuner.loading`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft import PeftModel
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn

from .adapter_state import state_dict_module_name

__all__ = ["AuxiliaryTensor", "auxiliary_tensors", "check_auxiliary_file_keys"]


@dataclass(frozen=True)
class AuxiliaryTensor:
    """One tensor an auxiliary wrapper loads for an adapter.

    Attributes:
        file_key: its key in an adapter file (``base_model.model.<module>.<tensor>``).
        model_key: its key after peft's renaming (``...<module>.modules_to_save.<adapter>.<tensor>``).
        target: the live tensor it is loaded into (its shape and dtype are what the file must fit).
    """

    file_key: str
    model_key: str
    target: torch.Tensor


def _tensor(module: nn.Module, dotted: str) -> torch.Tensor:
    owner_name, _, leaf = dotted.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    return getattr(owner, leaf)


def auxiliary_tensors(model: nn.Module, adapter_name: str) -> list[AuxiliaryTensor]:
    """Every tensor that peft's auxiliary wrappers in ``model`` load for ``adapter_name``.

    Args:
        model: a ``PeftModel`` (keys start with ``base_model.model.``) or the base model a
            ``PeftModel`` is being built around (its module names get that prefix).
        adapter_name: the adapter being loaded.
    """
    prefix = "" if isinstance(model, PeftModel) else "base_model.model."
    result = []
    for name, module in model.named_modules():
        if isinstance(module, AuxiliaryTrainingWrapper):
            name = prefix + state_dict_module_name(name)
            for file_leaf, model_leaf in module.adapter_state_dict_load_map(adapter_name).items():
                result.append(AuxiliaryTensor(f"{name}.{file_leaf}", f"{name}.{model_leaf}", _tensor(module, model_leaf)))
    return result


def check_auxiliary_file_keys(model: nn.Module, adapter_name: str, file_keys: set[str]) -> list[str]:
    """What an adapter file lacks or holds twice for the auxiliary wrappers (empty if nothing).

    A wrapper's tensor must be in the file under its file key; the same tensor under the loaded-model
    key (with the ``modules_to_save.<adapter>`` segment) is not a file key: peft would overwrite it
    with the file key's tensor, or fail with a bare ``KeyError`` if that one is missing.
    """
    problems = []
    for tensor in auxiliary_tensors(model, adapter_name):
        if tensor.model_key in file_keys:
            problems.append(f"{tensor.model_key} is a loaded-model key, not an adapter file key "
                            f"(the file key is {tensor.file_key})")
        elif tensor.file_key not in file_keys:
            problems.append(f"modules_to_save tensor {tensor.file_key} missing")
    return problems
