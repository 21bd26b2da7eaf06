"""Loading a PiCa adapter: the whole path of ``PeftModel.from_pretrained`` and ``load_adapter``, in order.

:func:`load_checked` runs around both (:mod:`pica.tuner.integration`):

1. **Read once, validate everything**, under the directory's shared lock (a concurrent save waits): the config
   (:func:`read_config`), the weights, every tensor checked (:func:`read_adapter`), the arguments (:func:`check_arguments`),
   the file's patterns bounded in time (:func:`pica.patterns.check_pattern_cost`). Nothing is built yet.
2. **Build and load** in :func:`pica.module_state.restore_on_error`, the tensors published to this thread (:data:`_LOADING`),
   ``from_pretrained`` handed the config. peft calls back: (a) ``inject_adapter`` takes each ``P`` from the file
   (:func:`projectors_being_loaded`); (b) ``load_peft_weights`` returns the validated tensors (:func:`validated_weights`);
   (c) the remap hook checks them against the model (:func:`check_for_model`; ``set_peft_model_state_dict`` alone too).
3. **Restore on any error**; a ``ValueError``/``KeyError`` of a step that does not know the file is raised as
   :class:`pica.io.AdapterFileError` naming the directory.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from huggingface_hub import hf_hub_download
from peft.config import PeftConfig
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from peft.utils.constants import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME
from torch import nn

from ..adapter_format import UPDATE_PREFIX, check_tensor, file_projectors, head_key_problems, local_path, misfit
from ..fingerprint import FINGERPRINT_SIZE
from ..io import AdapterFileError, check_safetensors_file, read_json_object, read_safetensors_file, reading_directory
from ..load_arguments import call_arguments, refuse_unhonoured
from ..module_state import restore_on_error
from ..patterns import check_pattern_cost
from ..quantization_record import adapter_view
from ..sketch import SKETCH_TOLERANCE, align_to_sketch
from .adapter_state import auxiliary_tensors, state_dict_module_name
from .config import PICA_PEFT_TYPE, PiCaConfig
from .layer import fingerprint_mismatches, merged_adapter_names, pica_layers

__all__ = ["check_for_model", "load_checked", "projectors_being_loaded", "refuse_transformers_load_adapter", "validated_weights"]


class _Load(NamedTuple):
    adapter_name: str
    path: Path
    tensors: dict[str, torch.Tensor]  # validated, under file keys
    model: nn.Module  # the PeftModel, or the base model a PeftModel is being built around


_LOADING: contextvars.ContextVar[_Load | None] = contextvars.ContextVar("pica_loading", default=None)


def load_checked(original: Callable, owner: Any, *args: Any, **kwargs: Any) -> Any:
    """Body of the wrappers of ``PeftModel.from_pretrained`` (``owner``: the class) and ``load_adapter`` (``owner``:
    the ``PeftModel``): steps 1-3 above. Another method's adapter, or a nested call, goes to peft unchanged."""
    passed = call_arguments(original, owner, *args, **kwargs)
    path = _adapter_directory(passed) if _LOADING.get() is None else None
    if path is None:
        return original(owner, *args, **kwargs)
    model, given = passed.get("model", owner), passed.get("config")
    with reading_directory(path):  # 1. read once, validate everything
        config = given if given is not None else read_config(path)
        if config is not None:
            check_arguments(passed, model, path, config)
            if given is None:  # patterns from a file: bounded before peft matches them
                base = model.get_base_model() if hasattr(model, "get_base_model") else model
                check_pattern_cost(config.to_dict(), [name for name, _ in base.named_modules()], str(path / CONFIG_NAME))
            load = _Load(passed.get("adapter_name", "default"), path, read_adapter(path, config), model)
    if config is None:  # another peft method's adapter
        return original(owner, *args, **kwargs)
    if "model" in passed:  # from_pretrained: peft builds with this config instead of parsing the file again
        passed["config"] = config
    token = _LOADING.set(load)
    try:  # 2. build and load; 3. restore on any error
        with restore_on_error(model):
            return original(owner, **passed)
    except (ValueError, KeyError) as error:
        if isinstance(error, AdapterFileError):
            raise
        raise AdapterFileError(f"{path}: {error}") from error
    finally:
        _LOADING.reset(token)


def _adapter_directory(passed: dict[str, Any]) -> Path | None:
    """The directory to read (a Hub adapter is downloaded), or None: another method's, or an unresolvable Hub id
    (peft raises its own error). Raises ``AdapterFileError`` for a PiCa file given another method's config."""
    model_id, subfolder, config = passed["model_id"], passed.get("subfolder"), passed.get("config")
    path = local_path(model_id, subfolder)
    if config is not None and not isinstance(config, PiCaConfig):
        file = path / CONFIG_NAME if path else None
        if file and file.is_file() and read_json_object(file).get("peft_type") == PICA_PEFT_TYPE.value:
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
    """``path/adapter_config.json`` as peft's ``PeftConfig.from_pretrained`` builds it; None for another method's.
    Raises ``AdapterFileError``: missing, not JSON, no or an unknown ``peft_type``, an invalid field (naming it)."""
    if not path.is_dir():
        raise AdapterFileError(f"adapter directory {path} does not exist")
    values = read_json_object(file := path / CONFIG_NAME)
    if (peft_type := values.get("peft_type")) is None:
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
    """``path/adapter_model.safetensors``, every tensor checked (:func:`pica.adapter_format.check_tensor`).
    Raises ``AdapterFileError``: missing, empty, truncated or corrupt file; bad tensors (naming the first ones)."""
    tensors = read_safetensors_file(file := path / SAFETENSORS_WEIGHTS_NAME)
    if problems := [problem for key, tensor in sorted(tensors.items()) if (problem := check_tensor(key, tensor, config.rank))]:
        raise AdapterFileError(f"{file}: {len(problems)} bad tensor(s): " + "; ".join(problems[:6]))
    return tensors


_DESCRIPTIVE = {"inference_mode", "auto_mapping", "base_model_name_or_path", "revision", "peft_version"}  # no effect on M


def check_arguments(passed: dict[str, Any], model: nn.Module, path: Path, config: PiCaConfig) -> None:
    """Refuse what a PiCa load would ignore or misread: arguments (``passed``, by name) not honoured (``TypeError``,
    or ``ValueError`` for a value: :func:`pica.load_arguments.refuse_unhonoured`); merged PiCa layers, or an existing
    adapter name with another config, naming the fields (``ValueError``)."""
    refuse_unhonoured(passed, model, where := f"PiCa adapter {path}", config)
    if merged := merged_adapter_names(model):
        raise ValueError(f"{where}: PiCa adapter(s) {merged} are merged into the base weights; call "
                         "unmerge_adapter() before loading an adapter (the layers' base weights must be W0)")
    existing = getattr(model, "peft_config", {}).get(passed.get("adapter_name"))
    ours, theirs = (existing.to_dict(), config.to_dict()) if existing is not None else ({}, {})
    if differ := sorted(k for k in ours.keys() | theirs.keys() if k not in _DESCRIPTIVE and ours.get(k) != theirs.get(k)):
        raise ValueError(f"{where}: adapter {passed['adapter_name']!r} already exists with another config "
                         f"(fields {differ} differ); load it under a new adapter_name or delete_adapter() first")


def projectors_being_loaded(adapter_name: str, config: PiCaConfig) -> dict[str, torch.Tensor] | None:
    """2a. Module name → validated ``P`` of the file this thread loads as ``adapter_name``, if it stores every
    ``P`` (``projector_storage="full"``); None otherwise (the projectors are computed)."""
    load = _LOADING.get()
    if load is None or load.adapter_name != adapter_name or config.projector_storage != "full":
        return None
    return file_projectors(load.tensors)


def validated_weights(original: Callable, model_id: Any, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
    """2b. Body of the ``load_peft_weights`` wrapper: during a PiCa load, the tensors of 1 (on ``device``). Raises
    ``AdapterFileError``: a ``key_mapping`` (the model's ``_checkpoint_conversion_mapping``), or a head's tensor
    missing or under its loaded-model key (peft renames file keys before the remap hook)."""
    if (load := _LOADING.get()) is None:
        return original(model_id, *args, **kwargs)
    values = call_arguments(original, model_id, *args, **kwargs)
    if values.get("key_mapping"):
        raise AdapterFileError(f"{load.path}: key_mapping is not supported for PiCa adapters")
    if problems := head_key_problems(auxiliary_tensors(load.model, load.adapter_name), load.tensors):
        raise AdapterFileError(f"{load.path / SAFETENSORS_WEIGHTS_NAME}: " + "; ".join(problems[:6]))
    device = values.get("device")
    return {key: tensor.to(device) if device else tensor for key, tensor in load.tensors.items()}


def check_for_model(model: nn.Module, config: PiCaConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
                    ) -> dict[str, torch.Tensor]:
    """2c. The remap hook: check an adapter state dict (model keys) against the ``PeftModel`` it is about to be
    loaded into; return what to load: each ``P`` the file does not store added (compact: aligned to its sketch;
    a file of the removed ``"none"``: as computed at injection), the sketches removed.

    Raises:
        ValueError: naming modules with tensors missing, mis-shaped or not finite in the dtype they are loaded into
            (``M``: float32, a head: the model's), another base's fingerprint, a missed sketch, tensors ``config``
            does not account for; or a model whose parameter names hide the ``PeftModel``'s.
    """
    load, storage = _LOADING.get(), config.projector_storage
    rank = None if load is not None and load.adapter_name == adapter_name else config.rank  # None: checked in 1
    layers = [(state_dict_module_name(name), layer) for name, layer in pica_layers(model, adapter_name)]
    wanted = {f"{UPDATE_PREFIX}{adapter_name}.{key}": (  # shapes from layers: under FSDP the live M may be a flat shard
        f"M of group '{key}'", (layer.out_features, layer.rank[adapter_name]), layer._pica_updates[adapter_name][key].dtype)
        for key, layer in {layer.pica_group[adapter_name]: layer for _, layer in layers}.items()}
    wanted |= {t.model_key: (f"modules_to_save tensor {t.file_key}", tuple(t.target.shape), t.target.dtype)
               for t in auxiliary_tensors(model, adapter_name)}
    result = {key: value for key, value in state_dict.items() if not key.endswith(".pica_sketch")}
    sketches, projector_problems = {f"{name}.pica_sketch" for name, _ in layers if storage == "compact"}, []
    for name, layer in layers:
        p_key, sketch = f"{name}.pica_P.{adapter_name}", state_dict.get(f"{name}.pica_sketch")
        wanted[f"{name}.pica_fingerprint.{adapter_name}"] = (
            f"{name}: fingerprint", (FINGERPRINT_SIZE,), layer.pica_fingerprint[adapter_name].dtype)
        if storage == "full":
            wanted[p_key] = (f"{name}: P", (layer.rank[adapter_name], layer.in_features), layer.pica_P[adapter_name].dtype)
        elif p_key in state_dict:
            projector_problems.append(f"{name}: the file stores P but projector_storage is {storage!r}")
        elif sketch is None and config.__dict__.get("unsketched"):  # saved with the removed "none"
            result[p_key] = layer.pica_P[adapter_name]
        elif sketch is None:
            projector_problems.append(f"{name}: projector sketch missing (projector_storage='compact')")
        elif not (weight := adapter_view(layer.get_base_layer(), layer.pica_scheme.get(adapter_name))).is_meta:
            result[p_key], residual = align_to_sketch(layer.pica_P[adapter_name], weight, sketch)  # weight: (out, in)
            if not residual <= SKETCH_TOLERANCE:
                projector_problems.append(
                    f"{name}: projector recomputed from this base misses the saved sketch (residual {residual:.3g} > "
                    f"{SKETCH_TOLERANCE:g}); save with projector_storage='full' to load here")
    misfits = {key: problem for key, (what, shape, dtype) in wanted.items()
               if (problem := misfit(key, state_dict.get(key), what, shape, dtype, rank))}
    problems = [*misfits.values(), *projector_problems]
    if unused := sorted(set(state_dict) - set(wanted) - sketches):
        problems.append(f"{len(unused)} tensor(s) that this PiCaConfig does not account for: {', '.join(unused[:6])}")
    if mismatch := fingerprint_mismatches([(name, layer, adapter_name, state_dict[key]) for name, layer in layers
                                           if (key := f"{name}.pica_fingerprint.{adapter_name}") not in misfits]):
        problems.insert(0, mismatch)
    if problems:
        raise ValueError(f"Cannot load PiCa adapter '{adapter_name}': " + "; ".join(problems[:8]))
    if not any(name.startswith("base_model.model.") for name, _ in model.named_parameters()):
        raise ValueError(  # peft 0.21.2 would strip "base_model.model." from every key: P, fingerprints not loaded
            f"Cannot load PiCa adapter '{adapter_name}' into {type(model).__name__}: its parameter names hide the "
            "PeftModel's, so peft would drop the per-layer tensors. Under FSDP1 call set_peft_model_state_dict inside "
            "FullyShardedDataParallel.summon_full_params(model), or load before wrapping.")
    return result


def refuse_transformers_load_adapter(original: Callable, self: nn.Module, peft_model_id: str | None = None,
                                     *args: Any, **kwargs: Any) -> Any:
    """Body of the transformers ``load_adapter`` wrapper. Raises ``ValueError`` for a PiCa adapter (``peft_config``,
    or a local directory, its files checked as for a load), pointing to ``PeftModel.from_pretrained``."""
    config = kwargs.get("peft_config")
    local = local_path(peft_model_id, (kwargs.get("adapter_kwargs") or {}).get("subfolder")) if peft_model_id else None
    if config is None and local is not None and isinstance(config := read_config(local), PiCaConfig):
        check_safetensors_file(local / SAFETENSORS_WEIGHTS_NAME)
    if isinstance(config, PiCaConfig):
        raise ValueError(  # noqa: TRY004  (a value the call cannot take: the PiCa adapter it names)
            f"PiCa adapter {peft_model_id or ''}: load it with peft.PeftModel.from_pretrained(model, path); transformers' "
            "load_adapter keeps no tuner module, and PiCa's shared M lives on the tuner (what lets per-layer FSDP work)")
    return original(self, peft_model_id, *args, **kwargs)
