"""Arguments of ``PeftModel.from_pretrained`` / ``load_adapter`` that a PiCa load refuses instead of ignoring.

peft accepts several arguments that PiCa cannot honour and would drop without a word: PiCa
has no ephemeral GPU offload, checks every tensor's shape (``ignore_mismatched_sizes=True`` would
mean "skip mismatches"), reads safetensors only, and has fixed file keys (``key_mapping``). peft also
passes unknown keyword arguments on to functions that ignore them, and config fields given as
keyword arguments lose against the file's values. Each of these is refused here, before the load
path (:func:`pica.tuner.loading.load_checked`) builds anything.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

from huggingface_hub import hf_hub_download
import torch
from torch import nn

from .config import PiCaConfig
from .layer import merged_adapter_names

__all__ = ["call_arguments", "check_load_arguments"]

_UNSUPPORTED = {  # argument -> (the one value PiCa supports, why no other)
    "ephemeral_gpu_offload": (False, "PiCa has no ephemeral GPU offload"),
    "ignore_mismatched_sizes": (False, "PiCa checks that every tensor fits its layer and refuses one that does not"),
    "use_safetensors": (True, "PiCa adapters are read from adapter_model.safetensors only"),
}
_OFFLOAD = ("device_map", "max_memory", "offload_folder", "offload_dir", "offload_index")  # used by peft's load_adapter
_FORWARDED = frozenset({"torch_device"})
"""Arguments ``from_pretrained`` passes on (``**kwargs``) to ``load_adapter``, which declares and honours them
(``torch_device``: the validated tensors are moved there, :func:`pica.tuner.loading.validated_weights`)."""
_DESCRIPTIVE = frozenset({"inference_mode", "auto_mapping", "base_model_name_or_path", "revision", "peft_version"})
"""Config fields that do not change what an adapter's tensors mean (peft fills some in when saving)."""
_CONFIG_FIELDS = frozenset(field.name for field in dataclasses.fields(PiCaConfig)) | {"store_projector"}


def call_arguments(function: Callable, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """A call's arguments by name (defaults filled in, ``**kwargs`` merged), however they were passed."""
    bound = inspect.signature(function).bind_partial(*args, **kwargs)
    bound.apply_defaults()
    values = dict(bound.arguments)
    values.update(values.pop("kwargs", None) or {})
    return values


def _names_where_model_is(device_map: Any, model: nn.Module) -> bool:
    """True if ``device_map`` puts the whole model on one device (``"cpu"``, ``torch.device``, ``{"": d}``)
    and every parameter and buffer of an undispatched model is already there."""
    if getattr(model, "hf_device_map", None) is not None:
        return False
    if isinstance(device_map, dict):
        if set(device_map) != {""}:
            return False
        device_map = device_map[""]
    if isinstance(device_map, int) and not isinstance(device_map, bool):
        device_map = f"cuda:{device_map}"
    try:
        device = torch.device(device_map)
    except (RuntimeError, TypeError):  # "auto", "balanced", ...: a dispatch request, not a place
        return False
    tensors = [*model.parameters(), *model.buffers()]

    def same(other: torch.device) -> bool:
        return other.type == device.type and (device.index is None or other.index == device.index)

    return bool(tensors) and all(same(tensor.device) for tensor in tensors)


def check_load_arguments(original: Callable, values: dict[str, Any], model: nn.Module, path: Path,
                         config: PiCaConfig) -> None:
    """Refuse arguments of a PiCa load that would be ignored or silently change its meaning.

    Args:
        original: peft's ``from_pretrained`` or ``load_adapter`` (its signature tells declared
            arguments from ``**kwargs``).
        values: the call's arguments by name (:func:`call_arguments`).
        model: the ``PeftModel`` (``load_adapter``) or base model (``from_pretrained``).
        path: the local adapter directory.
        config: the adapter's ``PiCaConfig`` (from the file, or the ``config`` argument).

    Raises:
        ValueError: an unsupported value (naming the argument), a Hub ``revision`` for a local
            directory, a ``key_mapping``, PiCa layers with merged adapters, or an existing adapter name
            whose config differs from the file's (naming the fields).
        TypeError: an unknown keyword argument, or a config field passed as one.
    """
    where = f"PiCa adapter {path}"
    for name, (supported, why) in _UNSUPPORTED.items():
        if name in values and values[name] != supported:
            raise ValueError(f"{where}: {name}={values[name]!r} is not supported ({why})")
    if values.get("key_mapping"):
        raise ValueError(f"{where}: key_mapping is not supported (PiCa file keys are fixed)")
    if values.get("revision") is not None:
        raise ValueError(f"{where}: revision={values['revision']!r} applies to Hub repositories; {path} is local")
    declared = set(inspect.signature(original).parameters) | _FORWARDED
    extra = sorted(set(values) - declared - set(_UNSUPPORTED))
    hub = set(inspect.signature(hf_hub_download).parameters) | {"use_auth_token"}
    fields = [name for name in extra if name in _CONFIG_FIELDS and name not in hub]
    if fields:
        raise TypeError(f"{where}: {fields} are PiCaConfig fields, which peft would ignore here in favour of the "
                        "file's values; pass config=PiCaConfig(...) to from_pretrained to override the file")
    unknown = [name for name in extra if name not in hub and name not in _OFFLOAD]
    if unknown:
        raise TypeError(f"{where}: unexpected keyword argument(s) {unknown} (peft would ignore them)")
    offload = [name for name in extra if name in _OFFLOAD]
    if offload == ["device_map"] and _names_where_model_is(values["device_map"], model):
        offload = []  # e.g. device_map={"": "cpu"} for a model on the CPU: true as it stands, nothing to do
    if offload and getattr(model, "hf_device_map", None) is None:
        raise ValueError(f"{where}: {offload} apply only to a model dispatched with a device_map (peft would ignore them)")
    if not hasattr(model, "peft_config"):
        return
    merged = merged_adapter_names(model)
    if merged:
        raise ValueError(f"{where}: PiCa adapter(s) {merged} are merged into the base weights; call "
                         "unmerge_adapter() before loading an adapter (the layers' base weights must be W0)")
    existing = model.peft_config.get(values["adapter_name"])
    if existing is not None:
        ours, theirs = existing.to_dict(), config.to_dict()
        differ = sorted(key for key in ours.keys() | theirs.keys()
                        if key not in _DESCRIPTIVE and ours.get(key) != theirs.get(key))
        if differ:
            raise ValueError(f"{where}: adapter {values['adapter_name']!r} already exists with another config "
                             f"(fields {differ} differ); load it under a new adapter_name or delete_adapter() first")
