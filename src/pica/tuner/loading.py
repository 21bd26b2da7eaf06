"""Loading a PiCa adapter: the one path from ``PeftModel.from_pretrained`` to the checks.

``PeftModel.from_pretrained(base, path)`` and ``peft_model.load_adapter(path, name)`` of a PiCa
adapter run :func:`load_checked` (installed around both by :mod:`pica.tuner.integration`):

1. **Validate before building.** :func:`pica.tuner.load_arguments.check_load_arguments` refuses
   arguments peft would ignore (or a load into merged layers, or over an existing adapter of another
   config); :func:`pica.tuner.adapter_dir.pica_adapter` and :func:`read_adapter`
   check the directory, ``adapter_config.json``
   (a valid ``PiCaConfig``) and every tensor of ``adapter_model.safetensors``: a complete file,
   floating dtypes, finite values, shapes that fit the config's rank, ``P`` rows orthonormal to
   :data:`ORTHONORMAL_TOLERANCE`. Nothing has been built yet, so an error changes nothing.
2. **Build and load,** inside :func:`pica.module_state.restore_on_error`, with the validated tensors published to
   this thread (:func:`projectors_being_loaded`, the one context variable):

   a. peft injects the layers; :meth:`PiCaModel.inject_adapter` takes every ``P`` from the file
      (``projector_storage="full"``) instead of computing it;
   b. peft's ``load_peft_weights`` returns the validated tensors (:func:`validated_weights`), so
      the file is read once, by safetensors: no pickle reader is ever reached;
   c. peft's ``set_peft_model_state_dict`` calls the tuner's remap hook, which calls
      :func:`check_for_model`: each ``M``, ``P``, fingerprint and ``modules_to_save`` tensor the
      layers and wrappers need is there with its shape, finite in the dtype it is loaded into, every
      fingerprint matches this base, compact sketches are matched, and no tensor is left that the
      config does not account for (``modules_to_save`` file keys are checked in b, before peft renames them).
3. **Restore on any error.** ``restore_on_error`` puts the model back exactly (module tree,
   parameters, buffers, hooks, attributes, ``requires_grad``, training flags) and the error is raised
   as :class:`pica.io.AdapterFileError` naming the adapter.

Loads that skip step 1 (``set_peft_model_state_dict``, Trainer checkpoints) still go through
:func:`check_for_model`; a raw ``load_state_dict`` meets the layers' fingerprint hook
(:mod:`pica.tuner.layer`). transformers' ``model.load_adapter`` is refused for PiCa adapters
(:func:`refuse_transformers_load_adapter`): it injects through peft's ``inject_adapter_in_model``,
which keeps no tuner, and PiCa's shared ``M`` lives on the tuner.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft.utils.constants import SAFETENSORS_WEIGHTS_NAME
from safetensors.torch import load_file
from torch import nn

from ..io import AdapterFileError, check_safetensors_file, reading_directory
from ..module_state import restore_on_error
from ..fingerprint import FINGERPRINT_SIZE, FINGERPRINT_TOLERANCE
from ..sketch import SKETCH_SIZE, SKETCH_TOLERANCE, align_to_sketch
from .adapter_dir import local_path, pica_adapter, validate_adapter_directory
from .adapter_state import UPDATE_PREFIX, state_dict_module_name
from .auxiliary_state import auxiliary_tensors, check_auxiliary_file_keys
from .load_arguments import call_arguments, check_load_arguments
from .config import PiCaConfig
from .layer import pica_layers
from .quantized import adapter_view, is_quantized

logger = logging.getLogger(__name__)

__all__ = ["ORTHONORMAL_TOLERANCE", "check_for_model", "load_checked", "projectors_being_loaded", "read_adapter",
           "refuse_transformers_load_adapter", "validated_weights"]

ORTHONORMAL_TOLERANCE = 1e-4
"""Largest accepted ``|P Pᵀ − I|`` entry of a stored ``P`` (saved ones are orthonormal to ~1e-6 in fp32)."""


@dataclass(frozen=True)
class _Load:
    adapter_name: str
    path: Path
    tensors: dict[str, torch.Tensor]
    model: nn.Module  # the PeftModel, or the base model a PeftModel is being built around


_LOADING: contextvars.ContextVar[_Load | None] = contextvars.ContextVar("pica_loading", default=None)


# ------------------------------------------------------------------------------- 1. validate files


def check_tensor(key: str, tensor: torch.Tensor, rank: int) -> str | None:
    """What is wrong with one stored tensor of a PiCa adapter, judged by its key (None if nothing)."""
    if not tensor.is_floating_point():
        return f"{key}: dtype {tensor.dtype}, not a floating dtype"
    if not torch.isfinite(tensor).all():
        return f"{key}: non-finite values"
    leaf = key.rsplit(".", 1)[-1]
    if key.startswith(UPDATE_PREFIX) or leaf == "pica_M":
        if tensor.ndim != 2 or tensor.shape[1] != rank:
            return f"{key}: M has shape {tuple(tensor.shape)}, expected (out_features, {rank})"
    elif leaf == "pica_fingerprint" and tuple(tensor.shape) != (FINGERPRINT_SIZE,):
        return f"{key}: fingerprint has shape {tuple(tensor.shape)}, expected ({FINGERPRINT_SIZE},)"
    elif leaf == "pica_sketch" and tuple(tensor.shape) != (rank, SKETCH_SIZE):
        return f"{key}: sketch has shape {tuple(tensor.shape)}, expected ({rank}, {SKETCH_SIZE})"
    elif leaf == "pica_P":
        if tensor.ndim != 2 or tensor.shape[0] != rank:
            return f"{key}: P has shape {tuple(tensor.shape)}, expected ({rank}, in_features)"
        gram = tensor.float() @ tensor.float().T  # (rank, rank)
        error = float((gram - torch.eye(rank, device=tensor.device)).abs().max())
        if error > ORTHONORMAL_TOLERANCE:
            return f"{key}: P rows are not orthonormal (|P Pᵀ - I| = {error:.3g} > {ORTHONORMAL_TOLERANCE:g})"
    return None


def read_adapter(path: Path, config) -> dict[str, torch.Tensor]:
    """Read and validate every tensor of ``path/adapter_model.safetensors`` (see :func:`check_tensor`).

    Raises:
        AdapterFileError: naming the file and the first problems.
    """
    file = path / SAFETENSORS_WEIGHTS_NAME
    check_safetensors_file(file)
    try:
        tensors = load_file(file)
    except Exception as error:  # noqa: BLE001  (a file that passed the header check but cannot be read)
        raise AdapterFileError(f"cannot read {file}: {error}") from error
    problems = [problem for key, tensor in sorted(tensors.items()) if (problem := check_tensor(key, tensor, config.rank))]
    if problems:
        raise AdapterFileError(f"{file}: {len(problems)} bad tensor(s): " + "; ".join(problems[:6]))
    return tensors


# ------------------------------------------------------------------------------- 2. build and load


def projectors_being_loaded(adapter_name: str, config) -> dict[str, torch.Tensor] | None:
    """Module name → validated ``P`` from the file this thread is loading as ``adapter_name``, if it
    stores every ``P`` (``projector_storage="full"``); None otherwise (the projectors are computed)."""
    load = _LOADING.get()
    if load is None or load.adapter_name != adapter_name or config.projector_storage != "full":
        return None
    prefix, suffix = "base_model.model.", ".pica_P"
    return {key[len(prefix):-len(suffix)]: tensor for key, tensor in load.tensors.items()
            if key.startswith(prefix) and key.endswith(suffix)}


def validated_weights(original: Callable, model_id: Any, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
    """Body of the ``peft.peft_model.load_peft_weights`` wrapper: during a PiCa load, the tensors
    validated in step 1 (moved to ``device``); otherwise peft's own reader."""
    load = _LOADING.get()
    if load is None:
        return original(model_id, *args, **kwargs)
    values = call_arguments(original, model_id, *args, **kwargs)
    if values.get("key_mapping"):
        raise AdapterFileError(f"{load.path}: key_mapping is not supported for PiCa adapters")
    problems = check_auxiliary_file_keys(load.model, load.adapter_name, set(load.tensors))
    if problems:
        raise AdapterFileError(f"{load.path / SAFETENSORS_WEIGHTS_NAME}: " + "; ".join(problems[:6]))
    device = values.get("device")
    return {key: tensor.to(device) if device else tensor for key, tensor in load.tensors.items()}


def check_for_model(model: nn.Module, config, adapter_name: str, state_dict: dict[str, torch.Tensor]
                    ) -> dict[str, torch.Tensor]:
    """Check an adapter state dict (model keys) against the model it is about to be loaded into.

    Args:
        model: the ``PeftModel`` whose PiCa layers for ``adapter_name`` exist.
        config: the adapter's ``PiCaConfig``.
        adapter_name: adapter being loaded.
        state_dict: tensors under model keys (:func:`pica.tuner.adapter_state.to_model_keys`).

    Returns:
        What to load: the state dict with each ``P`` that the file does not store (compact: aligned to
        its sketch; ``"none"``: as computed at injection) and without the sketches.

    Raises:
        ValueError: naming modules with missing/mis-shaped/non-finite tensors (finite in the dtype
            of the tensor each is loaded into: ``M`` float32, a ``modules_to_save`` head the model's
            dtype), a fingerprint of another base, a missed sketch, or tensors the config does not
            account for (``modules_to_save`` tensors are those of peft's wrappers for this adapter,
            :func:`pica.tuner.auxiliary_state.auxiliary_tensors`).
    """
    load = _LOADING.get()
    validated = load is not None and load.adapter_name == adapter_name
    result, problems, mismatched = dict(state_dict), [], []
    consumed: set[str] = set()

    def need(key: str, what: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
        """The tensor under ``key`` if it is there with ``shape``, sound, and finite in ``dtype`` (the dtype
        of the tensor it is loaded into); else None, with the problem recorded."""
        tensor = state_dict.get(key)
        consumed.add(key)
        if tensor is None:
            problems.append(f"{what} missing")
        elif tuple(tensor.shape) != shape:
            problems.append(f"{what} has shape {tuple(tensor.shape)}, expected {shape}")
        elif not validated and (problem := check_tensor(key, tensor, config.rank)):
            problems.append(problem)
        elif not torch.isfinite(tensor.to(dtype)).all():
            problems.append(f"{what} ({tensor.dtype}) has values that are not finite in {dtype}, the dtype it is loaded into")
        else:
            return tensor
        return None

    layers = list(pica_layers(model, adapter_name))
    groups = {layer.pica_group[adapter_name]: layer for _, layer in layers}
    for key, layer in groups.items():  # shapes from the layers: under FSDP the live M may be a flat shard
        need(f"{UPDATE_PREFIX}{adapter_name}.{key}", f"M of group '{key}'", (layer.out_features, layer.rank[adapter_name]),
             layer._pica_updates[adapter_name][key].dtype)
    for tensor in auxiliary_tensors(model, adapter_name):
        need(tensor.model_key, f"modules_to_save tensor {tensor.file_key}", tuple(tensor.target.shape), tensor.target.dtype)
    for name, layer in layers:
        name = state_dict_module_name(name)
        stored = need(f"{name}.pica_fingerprint.{adapter_name}", f"{name}: fingerprint", (FINGERPRINT_SIZE,),
                      layer.pica_fingerprint[adapter_name].dtype)
        if stored is not None and not layer.pica_fingerprint[adapter_name].is_meta:
            distance = layer.fingerprint_distance(adapter_name, stored)
            if distance > FINGERPRINT_TOLERANCE:
                mismatched.append(f"{name} (distance {distance:.3g})")
        p_key, shape = f"{name}.pica_P.{adapter_name}", (layer.rank[adapter_name], layer.in_features)
        if config.projector_storage == "full":
            need(p_key, f"{name}: P", shape, layer.pica_P[adapter_name].dtype)
        elif p_key in state_dict:
            problems.append(f"{name}: the file stores P but projector_storage is {config.projector_storage!r}")
        elif config.projector_storage == "compact":
            sketch_key = f"{name}.pica_sketch"
            consumed.add(sketch_key)
            _align_projector(problems, result, name, layer, adapter_name, p_key, result.pop(sketch_key, None))
        else:
            result[p_key] = layer.pica_P[adapter_name]
    unused = sorted(key for key in state_dict if key not in consumed)
    if unused:
        problems.append(f"{len(unused)} tensor(s) that this PiCaConfig does not account for: {', '.join(unused[:6])}")
    if mismatched:
        quantized_here = any(is_quantized(layer.get_base_layer()) for _, layer in layers)
        hint = (" (this base is quantised: if the adapter was trained on full-precision weights, PiCa cannot "
                "reproduce them from the quantised ones; load it onto the full-precision base, or train on the "
                "quantised one)" if quantized_here else "")
        problems.insert(0, f"the adapter was trained on a different base model{hint}: base weights differ at "
                           f"{len(mismatched)} module(s): {', '.join(mismatched[:6])}")
    if problems:
        raise ValueError(f"Cannot load PiCa adapter '{adapter_name}': " + "; ".join(problems[:8]))
    if not any(name.startswith("base_model.model.") for name, _ in model.named_parameters()):
        raise ValueError(  # peft 0.21.2 would strip "base_model.model." from every key: P, fingerprints not loaded
            f"Cannot load PiCa adapter '{adapter_name}' into {type(model).__name__}: its parameter names hide the "
            "PeftModel's, so peft would drop the per-layer tensors. Under FSDP1 call set_peft_model_state_dict inside "
            "FullyShardedDataParallel.summon_full_params(model), or load before wrapping.")
    return result


def _align_projector(problems: list[str], state_dict: dict[str, torch.Tensor], name: str, layer, adapter_name: str,
                     p_key: str, sketch: torch.Tensor | None) -> None:
    """Compact storage: put the ``P`` recomputed at injection, aligned to its saved ``(rank, SKETCH_SIZE)``
    sketch, under ``p_key``; or record in ``problems`` why not (sketch missing, or missed)."""
    if sketch is None:
        problems.append(f"{name}: projector sketch missing (projector_storage='compact')")
        return
    weight = adapter_view(layer.get_base_layer(), layer.pica_scheme.get(adapter_name))  # (out, in), as P was read
    if weight.is_meta:
        return
    aligned, residual = align_to_sketch(layer.pica_P[adapter_name], weight, sketch)
    if not residual <= SKETCH_TOLERANCE:
        problems.append(f"{name}: projector recomputed from this base misses the saved sketch (residual "
                        f"{residual:.3g} > {SKETCH_TOLERANCE:g}); save with projector_storage='full' to load here")
        return
    state_dict[p_key] = aligned


def load_checked(original: Callable, owner: Any, *args: Any, **kwargs: Any) -> Any:
    """Body of the wrappers of ``PeftModel.from_pretrained`` (``owner``: the class) and
    ``PeftModel.load_adapter`` (``owner``: the ``PeftModel``): the load path described above."""
    if _LOADING.get() is not None:  # load_adapter called by from_pretrained: already on this path
        return original(owner, *args, **kwargs)
    values = call_arguments(original, owner, *args, **kwargs)
    adapter = pica_adapter(values)
    if adapter is None:
        return original(owner, *args, **kwargs)
    path, config = adapter
    adapter_name, model = values["adapter_name"], values.get("model", owner)
    check_load_arguments(original, values, model, path, config)
    with reading_directory(path):  # a concurrent save into the directory waits (or is waited for)
        if values.get("config") is None:  # the config that goes with the weights read now
            config = validate_adapter_directory(path)
        load = _Load(adapter_name, path, read_adapter(path, config), model)
    token = _LOADING.set(load)
    try:
        with restore_on_error(model):
            try:
                return original(owner, *args, **kwargs)
            except AdapterFileError:
                raise
            except (ValueError, KeyError) as error:
                said = str(error) if str(error).startswith("Cannot load PiCa") else f"cannot load PiCa adapter '{adapter_name}': {error}"
                raise AdapterFileError(f"{path}: {said}") from error
    finally:
        _LOADING.reset(token)


def refuse_transformers_load_adapter(original: Callable, self: nn.Module, peft_model_id: str | None = None,
                                     *args: Any, **kwargs: Any) -> Any:
    """Body of the transformers ``PeftAdapterMixin.load_adapter`` wrapper: refuse PiCa adapters.

    Raises:
        ValueError: ``peft_model_id`` or ``peft_config`` is a PiCa adapter; points to ``PeftModel.from_pretrained``.
    """
    config = kwargs.get("peft_config")
    local = local_path(peft_model_id, (kwargs.get("adapter_kwargs") or {}).get("subfolder")) if peft_model_id else None
    if isinstance(config, PiCaConfig) or (config is None and local is not None and validate_adapter_directory(local)):
        raise ValueError(
            f"PiCa adapter {peft_model_id or ''}: load it with peft.PeftModel.from_pretrained(model, path). "
            "transformers' load_adapter injects adapters with peft's inject_adapter_in_model, which keeps no "
            "tuner module, and PiCa's shared M lives on the tuner (that is what lets per-layer FSDP work).")
    return original(self, peft_model_id, *args, **kwargs)
