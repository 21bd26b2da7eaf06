"""A PiCa adapter directory: its file names, its tensor keys, and what each stored tensor must be (no peft).

File keys (peft removes the adapter name; ``<key>`` is the group with ``/`` for ``.``, e.g.
``model/layers/*/self_attn/q_proj``, or the module path for ``share_across_layers=False``)::

    base_model.pica_M.<key>                     (out_features, rank)   once per group
    base_model.model.<layer>.pica_fingerprint   (FINGERPRINT_SIZE,)    per layer, float64
    base_model.model.<layer>.pica_P             (rank, in_features)    per layer, projector_storage="full"
    base_model.model.<layer>.pica_sketch        (rank, SKETCH_SIZE)    per layer, projector_storage="compact"

Model keys add the adapter name (``base_model.pica_M.<adapter>.<key>``, ``<layer>.pica_P.<adapter>``); sketches keep
their file keys (the load checks consume them). pica 0.1.0 stored each ``M`` under one member layer
(``base_model.model.<layer>.pica_M``) and wildcarded every number of a role; :func:`model_keys` maps both.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import NamedTuple

import torch

from .fingerprint import FINGERPRINT_SIZE
from .grouping import group_of, update_key
from .io import AdapterFileError
from .sketch import SKETCH_SIZE

__all__ = ["ORTHONORMAL_TOLERANCE", "UPDATE_PREFIX", "AuxiliaryTensor", "check_tensor",
           "file_projectors", "head_key_problems", "local_path", "misfit", "model_keys", "state_dict_module_name"]

UPDATE_PREFIX = "base_model.pica_M."
ORTHONORMAL_TOLERANCE = 1e-4
"""Largest accepted ``|P Pᵀ − I|`` entry of a stored ``P`` (saved ones are orthonormal to ~1e-6 in fp32)."""
_LEGACY_UPDATE = re.compile(r"(?:base_model\.model\.)?(?P<layer>.+)\.pica_M")
_LAYER_TENSOR = re.compile(r".+\.(?:pica_P|pica_fingerprint)")


def local_path(model_id: str | os.PathLike, subfolder: str | None) -> Path | None:
    """The local adapter directory meant by ``model_id``, or None for a Hub repository id.

    Raises:
        AdapterFileError: a local-looking path that does not exist, or a file.
    """
    looks_local = isinstance(model_id, os.PathLike) or os.path.isabs(model_id) or str(model_id).startswith((".", "~"))
    path = Path(os.path.expanduser(str(model_id)))
    if not (looks_local or path.exists()):
        return None
    if not path.is_dir():
        raise AdapterFileError(f"adapter directory {path} does not exist" if not path.exists() else
                               f"{path} is a file; give the adapter directory, the folder with adapter_config.json")
    return path / subfolder if subfolder else path


def state_dict_module_name(name: str) -> str:
    """A module name as state-dict keys spell it (FSDP1 wrapper segments removed)."""
    return name.replace("_fsdp_wrapped_module.", "")


def model_keys(tensors: dict[str, torch.Tensor], adapter_name: str, share_across_layers: bool, groups: set[str]
               ) -> dict[str, torch.Tensor]:
    """An adapter file's ``tensors`` under model keys (``groups``: the model's group keys of the adapter).

    Raises:
        ValueError: two tensors for one key (an older file with a duplicated group), or see :func:`_model_key`.
    """
    result: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if (target := _model_key(key, adapter_name, share_across_layers, groups)) in result:
            raise ValueError(f"the adapter file holds two tensors for {target}: {key} and another")
        result[target] = value
    return result


def _model_key(key: str, adapter_name: str, share_across_layers: bool, groups: set[str]) -> str:
    """The model key of file key ``key``; a pica 0.1 ``M`` whose role wildcarded every number (``blocks/*/ff/*``)
    goes to the one group it names (``blocks/*/ff/0``).

    Raises:
        ValueError: a pica 0.1 ``M`` that stands for several of the model's groups.
    """
    if key.startswith(UPDATE_PREFIX) and "." not in key[len(UPDATE_PREFIX):]:
        group = key[len(UPDATE_PREFIX):]
    elif legacy := _LEGACY_UPDATE.fullmatch(key):
        group = update_key(group_of(state_dict_module_name(legacy["layer"]), share_across_layers))
    else:
        return f"{key}.{adapter_name}" if _LAYER_TENSOR.fullmatch(key) else key
    if groups and group not in groups:
        merged = sorted(g for g in groups if "/".join("*" if p.isdecimal() else p for p in g.split("/")) == group)
        if len(merged) > 1:
            raise ValueError(f"the file's M '{group}' was trained as one M shared by {merged}: pica 0.1 merged "
                             "positions in a module list (e.g. ff.0 and ff.2 of an nn.Sequential MLP) into one role, "
                             "which pica now trains as separate roles; this adapter cannot be loaded with its "
                             "meaning. Train it again")
        group = merged[0] if merged else group
    return f"{UPDATE_PREFIX}{adapter_name}.{group}"


class AuxiliaryTensor(NamedTuple):
    """One tensor a ``modules_to_save`` head loads for an adapter."""

    file_key: str  # peft saves the plain module's: base_model.model.classifier.weight
    model_key: str  # after peft's renaming, before the remap hook: ...classifier.modules_to_save.<adapter>.weight
    target: torch.Tensor  # the live tensor it is loaded into: the file's must fit its shape and dtype


def head_key_problems(heads: Iterable[AuxiliaryTensor], tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """What is wrong with the keys of the ``heads``' tensors in an adapter file's ``tensors``: missing, or under the
    loaded-model key (peft renames file keys before the remap hook, and would overwrite one or fail)."""
    return [f"{t.model_key} is a loaded-model key, not an adapter file key (the file key is {t.file_key})"
            if t.model_key in tensors else f"modules_to_save tensor {t.file_key} missing"
            for t in heads if t.model_key in tensors or t.file_key not in tensors]


def file_projectors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Module name → ``P`` of an adapter file's tensors (``base_model.model.<layer>.pica_P``)."""
    prefix, suffix = "base_model.model.", ".pica_P"
    return {key[len(prefix):-len(suffix)]: value for key, value in tensors.items()
            if key.startswith(prefix) and key.endswith(suffix)}


def check_tensor(key: str, tensor: torch.Tensor, rank: int) -> str | None:
    """What is wrong with one stored tensor, judged by its key (None if nothing): not floating, not finite, a shape
    that does not fit ``rank``, or ``P`` rows not orthonormal."""
    if not tensor.is_floating_point():
        return f"{key}: dtype {tensor.dtype}, not a floating dtype"
    if not torch.isfinite(tensor).all():
        return f"{key}: non-finite values"
    leaf, shape = key.rsplit(".", 1)[-1], tuple(tensor.shape)
    if key.startswith(UPDATE_PREFIX) or leaf == "pica_M":
        if tensor.ndim != 2 or shape[1] != rank:
            return f"{key}: M has shape {shape}, expected (out_features, {rank})"
    elif leaf == "pica_fingerprint" and shape != (FINGERPRINT_SIZE,):
        return f"{key}: fingerprint has shape {shape}, expected ({FINGERPRINT_SIZE},)"
    elif leaf == "pica_sketch" and shape != (rank, SKETCH_SIZE):
        return f"{key}: sketch has shape {shape}, expected ({rank}, {SKETCH_SIZE})"
    elif leaf == "pica_P":
        if tensor.ndim != 2 or shape[0] != rank:
            return f"{key}: P has shape {shape}, expected ({rank}, in_features)"
        gram = tensor.float() @ tensor.float().T  # (rank, rank)
        error = float((gram - torch.eye(rank, device=tensor.device)).abs().max())
        if error > ORTHONORMAL_TOLERANCE:
            return f"{key}: P rows are not orthonormal (|P Pᵀ - I| = {error:.3g} > {ORTHONORMAL_TOLERANCE:g})"
    return None


def misfit(key: str, tensor: torch.Tensor | None, what: str, shape: tuple[int, ...], dtype: torch.dtype,
           rank: int | None) -> str | None:
    """What is wrong with ``tensor`` (``what``, under ``key``) for a target of ``shape`` and ``dtype`` (None if
    nothing); with a ``rank``, also :func:`check_tensor` it (a tensor not checked when its file was read)."""
    if tensor is None:
        return f"{what} missing"
    if tuple(tensor.shape) != shape:
        return f"{what} has shape {tuple(tensor.shape)}, expected {shape}"
    if rank is not None and (problem := check_tensor(key, tensor, rank)):
        return problem
    if tensor.dtype != dtype and not torch.isfinite(tensor.to(dtype)).all():  # same dtype: checked when read
        return f"{what} ({tensor.dtype}) has values that are not finite in {dtype}, the dtype it is loaded into"
    return None
