"""Loading a PiCa adapter: the whole path of ``PeftModel.from_pretrained`` and ``load_adapter``, in order.

:func:`load_checked` runs around both (installed by :mod:`pica.tuner.integration`):

1. **Read once, validate everything.** Under the directory's shared lock (a concurrent save waits),
   ``adapter_config.json`` is parsed once (:func:`read_config`) and ``adapter_model.safetensors`` read
   once (:func:`read_adapter`); every tensor is checked (:func:`check_tensor`: floating, finite, shapes that
   fit the rank, ``P`` rows orthonormal), every argument peft would ignore is refused
   (:func:`check_arguments`, one table of what a PiCa load honours), and the regular expressions the file
   makes peft run must match the model's module names in bounded time (:func:`pica.patterns.check_pattern_cost`). Nothing is built yet: an error changes nothing.
2. **Build and load** inside :func:`pica.module_state.restore_on_error`, the validated tensors published to
   this thread (:data:`_LOADING`). ``from_pretrained`` is handed the config read in 1; peft calls back:

   a. ``PiCaModel.inject_adapter`` takes every ``P`` from the file (:func:`projectors_being_loaded`);
   b. peft's ``load_peft_weights`` returns the validated tensors (:func:`validated_weights`): no second read,
      no pickle reader reached;
   c. peft's ``set_peft_model_state_dict`` calls the tuner's remap hook, :func:`check_for_model`: every ``M``,
      ``P``, fingerprint and ``modules_to_save`` tensor the model needs is there, fits its target's shape and
      dtype, every fingerprint matches this base (:func:`pica.tuner.layer.fingerprint_mismatches`), compact
      sketches are matched, and nothing is left over.
3. **Restore on any error.** The model is put back exactly; a ``ValueError``/``KeyError`` from a step that
   does not know the file (peft, torch, the remap hook) is raised as :class:`pica.io.AdapterFileError`
   naming the directory.

``set_peft_model_state_dict`` alone (Trainer checkpoints) still meets :func:`check_for_model`; a raw
``load_state_dict`` meets the layers' fingerprint hook. transformers' ``model.load_adapter`` is refused
(:func:`refuse_transformers_load_adapter`): its injection keeps no tuner, where the shared ``M`` lives.
"""

from __future__ import annotations

import contextvars
import dataclasses
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import hf_hub_download
from peft.config import PeftConfig
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from peft.utils.constants import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME
from torch import nn

from ..fingerprint import FINGERPRINT_SIZE
from ..io import AdapterFileError, check_safetensors_file, read_json_object, read_safetensors_file, reading_directory
from ..module_state import restore_on_error
from ..patterns import check_pattern_cost
from ..sketch import SKETCH_SIZE, SKETCH_TOLERANCE, align_to_sketch
from .adapter_state import UPDATE_PREFIX, auxiliary_tensors, state_dict_module_name
from .config import PICA_PEFT_TYPE, PiCaConfig
from .layer import fingerprint_mismatches, merged_adapter_names, pica_layers
from ..quantization_record import adapter_view

__all__ = ["ORTHONORMAL_TOLERANCE", "call_arguments", "check_arguments", "check_for_model", "load_checked",
           "projectors_being_loaded", "read_adapter", "read_config", "refuse_transformers_load_adapter",
           "validated_weights"]

ORTHONORMAL_TOLERANCE = 1e-4
"""Largest accepted ``|P Pᵀ − I|`` entry of a stored ``P`` (saved ones are orthonormal to ~1e-6 in fp32)."""


@dataclass(frozen=True)
class _Load:
    adapter_name: str
    path: Path
    tensors: dict[str, torch.Tensor]  # validated, under file keys
    model: nn.Module  # the PeftModel, or the base model a PeftModel is being built around


_LOADING: contextvars.ContextVar[_Load | None] = contextvars.ContextVar("pica_loading", default=None)


def load_checked(original: Callable, owner: Any, *args: Any, **kwargs: Any) -> Any:
    """Body of the wrappers of ``PeftModel.from_pretrained`` (``owner``: the class) and
    ``PeftModel.load_adapter`` (``owner``: the ``PeftModel``): the load path described above."""
    if _LOADING.get() is not None:  # load_adapter called by from_pretrained: already on this path
        return original(owner, *args, **kwargs)
    passed = call_arguments(original, owner, *args, **kwargs)
    passed.pop(next(iter(inspect.signature(original).parameters)))  # cls / self: that is owner
    path = _adapter_directory(passed)
    if path is None:
        return original(owner, *args, **kwargs)
    model, adapter_name = passed.get("model", owner), passed.get("adapter_name", "default")
    with reading_directory(path):  # 1. read once, validate everything
        config = passed["config"] if passed.get("config") is not None else read_config(path)
        if config is not None:
            check_arguments(passed, model, path, config)
            if passed.get("config") is None:  # patterns from a file: bounded before peft matches them
                base = model.get_base_model() if hasattr(model, "get_base_model") else model
                check_pattern_cost(config.to_dict(), [name for name, _ in base.named_modules()], str(path / CONFIG_NAME))
            load = _Load(adapter_name, path, read_adapter(path, config), model)
    if config is None:  # another peft method's adapter
        return original(owner, *args, **kwargs)
    if "model" in passed:  # from_pretrained: peft builds with the config read above instead of parsing it again
        passed["config"] = config
    token = _LOADING.set(load)
    try:  # 2. build and load; 3. restore on any error
        with restore_on_error(model):
            try:
                return original(owner, **passed)
            except AdapterFileError:
                raise
            except (ValueError, KeyError) as error:
                raise AdapterFileError(f"{path}: {error}") from error
    finally:
        _LOADING.reset(token)


# ------------------------------------------------------------------------------- 1. read once


def local_path(model_id: str | os.PathLike, subfolder: str | None) -> Path | None:
    """The local adapter directory meant by ``model_id``, or None for a Hub repository id."""
    looks_local = isinstance(model_id, os.PathLike) or os.path.isabs(model_id) or str(model_id).startswith((".", "~"))
    path = Path(os.path.expanduser(str(model_id)))
    if not (looks_local or path.exists()):
        return None
    if not path.is_dir():
        raise AdapterFileError(f"adapter directory {path} does not exist" if not path.exists() else
                               f"{path} is a file; give the adapter directory that holds {CONFIG_NAME}")
    return path / subfolder if subfolder else path


def _adapter_directory(passed: dict[str, Any]) -> Path | None:
    """The directory to read (a Hub adapter is downloaded), or None: another method's, or an unresolvable Hub id
    (peft raises its own error). Raises ``AdapterFileError`` for a PiCa adapter given another method's config."""
    model_id, subfolder, config = passed["model_id"], passed.get("subfolder"), passed.get("config")
    path = local_path(model_id, subfolder)
    if config is not None and not isinstance(config, PiCaConfig):
        file = path / CONFIG_NAME if path is not None else None
        if file is not None and file.is_file() and read_json_object(file).get("peft_type") == PICA_PEFT_TYPE.value:
            raise AdapterFileError(f"{file}: a PiCa adapter, but config is a {type(config).__name__}: peft would load "
                                   "its tensors as that method's (and drop them); pass no config or a PiCaConfig")
        return None
    if path is not None:
        return path
    hub = {k: passed[k] for k in ("revision", "cache_dir", "token", "local_files_only") if passed.get(k) is not None}
    try:
        if config is None and PeftConfig._get_peft_type(str(model_id), subfolder=subfolder, **hub) != PICA_PEFT_TYPE.value:
            return None
        return Path(hf_hub_download(str(model_id), SAFETENSORS_WEIGHTS_NAME, subfolder=subfolder, **hub)).parent
    except Exception:  # noqa: BLE001  (not reachable, or not PiCa: peft raises its own error just after)
        return None


def read_config(path: Path) -> PiCaConfig | None:
    """``path/adapter_config.json``, parsed once, as peft's ``PeftConfig.from_pretrained`` builds it; None if it is
    another peft method's. Raises ``AdapterFileError``: missing, not JSON, no or an unknown ``peft_type``, an
    invalid ``PiCaConfig`` (naming the field)."""
    if not path.is_dir():
        raise AdapterFileError(f"adapter directory {path} does not exist")
    file = path / CONFIG_NAME
    values = read_json_object(file)
    peft_type = values.get("peft_type")
    if peft_type is None:
        raise AdapterFileError(f"{file}: field 'peft_type' is missing")
    if not isinstance(peft_type, str) or peft_type not in {str(getattr(t, "value", t)) for t in PEFT_TYPE_TO_CONFIG_MAPPING}:
        raise AdapterFileError(f"{file}: field 'peft_type' is {peft_type!r}, not a known PEFT method "
                               f"(PiCa adapters have {PICA_PEFT_TYPE.value!r})")
    if peft_type != PICA_PEFT_TYPE.value:
        return None
    values.pop("runtime_config", None)  # as peft's PeftConfig.from_json_file
    try:
        return PiCaConfig.from_peft_type(**PiCaConfig.check_kwargs(**values))
    except (ValueError, TypeError) as error:
        raise AdapterFileError(f"{file}: {error}") from error


def read_adapter(path: Path, config: PiCaConfig) -> dict[str, torch.Tensor]:
    """``path/adapter_model.safetensors``, read once, every tensor checked (:func:`check_tensor`). Raises
    ``AdapterFileError``: missing, empty, truncated or corrupt file; bad tensors (naming the first ones)."""
    file = path / SAFETENSORS_WEIGHTS_NAME
    tensors = read_safetensors_file(file)
    problems = [problem for key, tensor in sorted(tensors.items()) if (problem := check_tensor(key, tensor, config.rank))]
    if problems:
        raise AdapterFileError(f"{file}: {len(problems)} bad tensor(s): " + "; ".join(problems[:6]))
    return tensors


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


# ------------------------------------------------------------------------------- 1. refuse what would be ignored


def call_arguments(function: Callable, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """The arguments a call passes, by name, however passed (``**kwargs`` merged in; defaults not added)."""
    values = dict(inspect.signature(function).bind_partial(*args, **kwargs).arguments)
    values.update(values.pop("kwargs", None) or {})
    return values


_HONOURED = {  # argument of from_pretrained / load_adapter -> None (any value), or (the values honoured, why)
    **dict.fromkeys(("model", "model_id", "adapter_name", "is_trainable", "config", "autocast_adapter_dtype",
                     "low_cpu_mem_usage", "torch_device", "subfolder"), None),  # torch_device: validated_weights
    **dict.fromkeys(set(inspect.signature(hf_hub_download).parameters) - {"revision"} | {"use_auth_token"}, None),
    "ephemeral_gpu_offload": ((False,), "PiCa has no ephemeral GPU offload"),
    "ignore_mismatched_sizes": ((False,), "PiCa checks that every tensor fits its layer and refuses one that does not"),
    "use_safetensors": ((True,), "PiCa adapters are read from adapter_model.safetensors only"),
    "key_mapping": ((None, {}), "PiCa file keys are fixed: key_mapping is not supported"),
}
"""What a PiCa load honours; anything else is refused, so a parameter peft adds is never silently ignored.
Also honoured: ``revision`` for a Hub id, and :data:`_OFFLOAD` for a model dispatched with a device map."""
_OFFLOAD = ("device_map", "max_memory", "offload_folder", "offload_dir", "offload_index")
_DESCRIPTIVE = frozenset({"inference_mode", "auto_mapping", "base_model_name_or_path", "revision", "peft_version"})
"""Config fields that do not change what an adapter's tensors mean (peft fills some in when saving)."""
_CONFIG_FIELDS = frozenset(field.name for field in dataclasses.fields(PiCaConfig)) | {"store_projector"}


def check_arguments(passed: dict[str, Any], model: nn.Module, path: Path, config: PiCaConfig) -> None:
    """Refuse arguments of a PiCa load (``passed``, by name) that would be ignored or silently change its meaning.

    Raises:
        ValueError: a value not honoured (naming the argument), a ``revision`` for a local directory, offload
            arguments for an undispatched model, merged PiCa layers, or an existing adapter name whose config
            differs from ``config`` (naming the fields).
        TypeError: an argument not in :data:`_HONOURED`, or a config field passed as one.
    """
    where = f"PiCa adapter {path}"
    for name, value in passed.items():
        if _HONOURED.get(name) is not None and value not in _HONOURED[name][0]:
            raise ValueError(f"{where}: {name}={value!r} is not supported ({_HONOURED[name][1]})")
    if passed.get("revision") is not None and local_path(passed["model_id"], None) is not None:
        raise ValueError(f"{where}: revision={passed['revision']!r} applies to Hub repositories; {path} is local")
    extra = sorted(set(passed) - set(_HONOURED) - {"revision", *_OFFLOAD})
    if fields := [name for name in extra if name in _CONFIG_FIELDS]:
        raise TypeError(f"{where}: {fields} are PiCaConfig fields, which peft would ignore here in favour of the "
                        "file's values; pass config=PiCaConfig(...) to from_pretrained to override the file")
    if extra:
        raise TypeError(f"{where}: unexpected keyword argument(s) {extra} (peft would ignore them)")
    offload = [name for name in _OFFLOAD if name in passed]
    if offload and getattr(model, "hf_device_map", None) is None and not (
            offload == ["device_map"] and _is_where_model_is(passed["device_map"], model)):  # e.g. {"": "cpu"}: true
        raise ValueError(f"{where}: {offload} apply only to a model dispatched with a device_map (peft would ignore them)")
    if merged := merged_adapter_names(model):
        raise ValueError(f"{where}: PiCa adapter(s) {merged} are merged into the base weights; call "
                         "unmerge_adapter() before loading an adapter (the layers' base weights must be W0)")
    existing = getattr(model, "peft_config", {}).get(passed.get("adapter_name"))
    ours, theirs = (existing.to_dict(), config.to_dict()) if existing is not None else ({}, {})
    if differ := sorted(k for k in ours.keys() | theirs.keys() if k not in _DESCRIPTIVE and ours.get(k) != theirs.get(k)):
        raise ValueError(f"{where}: adapter {passed['adapter_name']!r} already exists with another config "
                         f"(fields {differ} differ); load it under a new adapter_name or delete_adapter() first")


def _is_where_model_is(device_map: Any, model: nn.Module) -> bool:
    """True if ``device_map`` (``"cpu"``, ``0``, ``torch.device``, ``{"": d}``) names the one device that holds
    every parameter and buffer of ``model`` (not ``"auto"`` and the like, which ask for a dispatch)."""
    device_map = device_map.get("") if isinstance(device_map, dict) and set(device_map) == {""} else device_map
    device_map = f"cuda:{device_map}" if isinstance(device_map, int) and not isinstance(device_map, bool) else device_map
    try:
        device = torch.device(device_map)
    except (RuntimeError, TypeError):
        return False
    tensors = [*model.parameters(), *model.buffers()]
    return bool(tensors) and all(t.device.type == device.type and device.index in (None, t.device.index) for t in tensors)


# ------------------------------------------------------------------------------- 2. peft's call-backs


def projectors_being_loaded(adapter_name: str, config: PiCaConfig) -> dict[str, torch.Tensor] | None:
    """2a. Module name → validated ``P`` from the file this thread is loading as ``adapter_name``, if it
    stores every ``P`` (``projector_storage="full"``); None otherwise (the projectors are computed)."""
    load = _LOADING.get()
    if load is None or load.adapter_name != adapter_name or config.projector_storage != "full":
        return None
    prefix, suffix = "base_model.model.", ".pica_P"
    return {key[len(prefix):-len(suffix)]: tensor for key, tensor in load.tensors.items()
            if key.startswith(prefix) and key.endswith(suffix)}


def validated_weights(original: Callable, model_id: Any, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
    """2b. Body of the ``peft.peft_model.load_peft_weights`` wrapper: during a PiCa load, the tensors validated
    in step 1 (moved to ``device``); otherwise peft's own reader. Raises ``AdapterFileError`` for a ``key_mapping``
    (peft passes the model's ``_checkpoint_conversion_mapping``) and for ``modules_to_save`` tensors missing or
    under the loaded-model key (peft renames file keys before the remap hook, and would overwrite or fail)."""
    load = _LOADING.get()
    if load is None:
        return original(model_id, *args, **kwargs)
    values = call_arguments(original, model_id, *args, **kwargs)
    if values.get("key_mapping"):
        raise AdapterFileError(f"{load.path}: key_mapping is not supported for PiCa adapters")
    problems = [f"{t.model_key} is a loaded-model key, not an adapter file key (the file key is {t.file_key})"
                if t.model_key in load.tensors else f"modules_to_save tensor {t.file_key} missing"
                for t in auxiliary_tensors(load.model, load.adapter_name)
                if t.model_key in load.tensors or t.file_key not in load.tensors]
    if problems:
        raise AdapterFileError(f"{load.path / SAFETENSORS_WEIGHTS_NAME}: " + "; ".join(problems[:6]))
    device = values.get("device")
    return {key: tensor.to(device) if device else tensor for key, tensor in load.tensors.items()}


def check_for_model(model: nn.Module, config: PiCaConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
                    ) -> dict[str, torch.Tensor]:
    """2c. Check an adapter state dict (model keys, :func:`pica.tuner.adapter_state.to_model_keys`) against the
    ``PeftModel`` it is about to be loaded into, and return what to load: each ``P`` the file does not store added
    (compact: aligned to its sketch; ``"none"``: as computed at injection), the sketches removed.

    Raises:
        ValueError: naming modules with missing/mis-shaped tensors, tensors not finite in the dtype they are
            loaded into (``M``: float32, a head: the model's), another base's fingerprint, a missed sketch, or
            tensors that ``config`` does not account for.
    """
    load = _LOADING.get()
    rank = None if load is not None and load.adapter_name == adapter_name else config.rank  # None: validated in 1
    layers = [(state_dict_module_name(name), layer) for name, layer in pica_layers(model, adapter_name)]
    storage = config.projector_storage
    wanted: dict[str, tuple[str, tuple[int, ...], torch.dtype]] = {}  # key -> (what, shape, dtype loaded into)
    for key, layer in {layer.pica_group[adapter_name]: layer for _, layer in layers}.items():  # shapes from layers:
        wanted[f"{UPDATE_PREFIX}{adapter_name}.{key}"] = (  # under FSDP the live M may be a flat shard
            f"M of group '{key}'", (layer.out_features, layer.rank[adapter_name]), layer._pica_updates[adapter_name][key].dtype)
    for t in auxiliary_tensors(model, adapter_name):
        wanted[t.model_key] = (f"modules_to_save tensor {t.file_key}", tuple(t.target.shape), t.target.dtype)
    for name, layer in layers:
        wanted[f"{name}.pica_fingerprint.{adapter_name}"] = (
            f"{name}: fingerprint", (FINGERPRINT_SIZE,), layer.pica_fingerprint[adapter_name].dtype)
        if storage == "full":
            wanted[f"{name}.pica_P.{adapter_name}"] = (
                f"{name}: P", (layer.rank[adapter_name], layer.in_features), layer.pica_P[adapter_name].dtype)
    misfits = {key: problem for key, (what, shape, dtype) in wanted.items()
               if (problem := _misfit(key, state_dict.get(key), what, shape, dtype, rank))}
    problems = list(misfits.values())
    result = {key: value for key, value in state_dict.items() if not key.endswith(".pica_sketch")}
    for name, layer in layers:
        p_key = f"{name}.pica_P.{adapter_name}"
        if storage != "full" and p_key in state_dict:
            problems.append(f"{name}: the file stores P but projector_storage is {storage!r}")
        elif storage == "compact":
            problems += _align_projector(result, name, layer, adapter_name, p_key, state_dict.get(f"{name}.pica_sketch"))
        elif storage == "none":
            result[p_key] = layer.pica_P[adapter_name]
    expected = set(wanted) | {f"{name}.pica_sketch" for name, _ in layers if storage == "compact"}
    if unused := sorted(set(state_dict) - expected):
        problems.append(f"{len(unused)} tensor(s) that this PiCaConfig does not account for: {', '.join(unused[:6])}")
    fingerprints = [(name, layer, f"{name}.pica_fingerprint.{adapter_name}") for name, layer in layers]
    if mismatch := fingerprint_mismatches([(name, layer, adapter_name, state_dict[key])
                                           for name, layer, key in fingerprints if key not in misfits]):
        problems.insert(0, mismatch)
    if problems:
        raise ValueError(f"Cannot load PiCa adapter '{adapter_name}': " + "; ".join(problems[:8]))
    if not any(name.startswith("base_model.model.") for name, _ in model.named_parameters()):
        raise ValueError(  # peft 0.21.2 would strip "base_model.model." from every key: P, fingerprints not loaded
            f"Cannot load PiCa adapter '{adapter_name}' into {type(model).__name__}: its parameter names hide the "
            "PeftModel's, so peft would drop the per-layer tensors. Under FSDP1 call set_peft_model_state_dict inside "
            "FullyShardedDataParallel.summon_full_params(model), or load before wrapping.")
    return result


def _misfit(key: str, tensor: torch.Tensor | None, what: str, shape: tuple[int, ...], dtype: torch.dtype,
            rank: int | None) -> str | None:
    """What is wrong with ``tensor`` for a target of ``shape`` and ``dtype`` (None if nothing); with a ``rank``,
    also :func:`check_tensor` it (a tensor not validated when its file was read)."""
    if tensor is None:
        return f"{what} missing"
    if tuple(tensor.shape) != shape:
        return f"{what} has shape {tuple(tensor.shape)}, expected {shape}"
    if rank is not None and (problem := check_tensor(key, tensor, rank)):
        return problem
    if tensor.dtype != dtype and not torch.isfinite(tensor.to(dtype)).all():  # same dtype: checked when read
        return f"{what} ({tensor.dtype}) has values that are not finite in {dtype}, the dtype it is loaded into"
    return None


def _align_projector(state_dict: dict[str, torch.Tensor], name: str, layer: nn.Module, adapter_name: str,
                     p_key: str, sketch: torch.Tensor | None) -> list[str]:
    """Compact storage: put the ``P`` recomputed at injection, aligned to its saved ``(rank, SKETCH_SIZE)``
    sketch, under ``p_key``; or return why not (sketch missing, or missed)."""
    if sketch is None:
        return [f"{name}: projector sketch missing (projector_storage='compact')"]
    weight = adapter_view(layer.get_base_layer(), layer.pica_scheme.get(adapter_name))  # (out, in), as P was read
    if weight.is_meta:
        return []
    aligned, residual = align_to_sketch(layer.pica_P[adapter_name], weight, sketch)
    if not residual <= SKETCH_TOLERANCE:
        return [f"{name}: projector recomputed from this base misses the saved sketch (residual "
                f"{residual:.3g} > {SKETCH_TOLERANCE:g}); save with projector_storage='full' to load here"]
    state_dict[p_key] = aligned
    return []


def refuse_transformers_load_adapter(original: Callable, self: nn.Module, peft_model_id: str | None = None,
                                     *args: Any, **kwargs: Any) -> Any:
    """Body of the transformers ``PeftAdapterMixin.load_adapter`` wrapper: a PiCa adapter (``peft_config``, or a
    local directory, whose files are checked as for a load) raises ``ValueError`` pointing to
    ``PeftModel.from_pretrained``; other adapters go to transformers."""
    config = kwargs.get("peft_config")
    local = local_path(peft_model_id, (kwargs.get("adapter_kwargs") or {}).get("subfolder")) if peft_model_id else None
    if config is None and local is not None and isinstance(config := read_config(local), PiCaConfig):
        check_safetensors_file(local / SAFETENSORS_WEIGHTS_NAME)
    if isinstance(config, PiCaConfig):
        raise ValueError(
            f"PiCa adapter {peft_model_id or ''}: load it with peft.PeftModel.from_pretrained(model, path). "
            "transformers' load_adapter injects adapters with peft's inject_adapter_in_model, which keeps no "
            "tuner module, and PiCa's shared M lives on the tuner (that is what lets per-layer FSDP work).")
    return original(self, peft_model_id, *args, **kwargs)
