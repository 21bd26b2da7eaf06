"""The arguments of a load call, by name, and the refusal of every one a PiCa load does not honour (no peft).

peft's argument names are data here (one table), so an argument peft adds later is refused, never silently ignored.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from huggingface_hub import hf_hub_download
from torch import nn

from .adapter_format import local_path

__all__ = ["ANY_VALUE", "OFFLOAD", "ONLY", "call_arguments", "refuse_unhonoured"]

ANY_VALUE = {"model", "model_id", "adapter_name", "is_trainable", "config", "autocast_adapter_dtype", "low_cpu_mem_usage",
             "torch_device", "subfolder", "use_auth_token", *inspect.signature(hf_hub_download).parameters} - {"revision"}
"""Arguments honoured whatever their value (``torch_device``: the tensors are moved; Hub download options)."""
ONLY = {  # argument -> (the values a PiCa load honours, why)
    "ephemeral_gpu_offload": ((False,), "PiCa has no ephemeral GPU offload"),
    "ignore_mismatched_sizes": ((False,), "PiCa checks that every tensor fits its layer and refuses one that does not"),
    "use_safetensors": ((True,), "PiCa adapters are read from adapter_model.safetensors only"),
    "key_mapping": ((None, {}), "PiCa file keys are fixed: key_mapping is not supported"),
}
OFFLOAD = ("device_map", "max_memory", "offload_folder", "offload_dir", "offload_index")
"""Honoured for a model dispatched with a device map only (and a ``device_map`` naming where the model is)."""


def call_arguments(function: Callable, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """The arguments a call of ``function`` passes, by name (``**kwargs`` merged in), without defaults or the first
    (``self``, ``cls``)."""
    signature = inspect.signature(function)
    values = dict(signature.bind_partial(*args, **kwargs).arguments)
    values.pop(next(iter(signature.parameters)), None)
    for name, parameter in signature.parameters.items():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            values.update(values.pop(name, {}))
    return values


def refuse_unhonoured(passed: dict[str, Any], model: nn.Module, where: str, config: object) -> None:
    """Refuse every argument of a load of ``model`` (``passed``, by name) but :data:`ANY_VALUE`, :data:`ONLY`'s values,
    ``revision`` for a Hub id, and :data:`OFFLOAD`; ``where`` starts each message.

    Raises:
        TypeError: an argument not honoured at all (naming it; a field of the adapter's ``config``, saying so).
        ValueError: a value not honoured, ``revision`` for a local directory, offload arguments for an undispatched model.
    """
    for name, (honoured, why) in ONLY.items():
        if name in passed and passed[name] not in honoured:
            raise ValueError(f"{where}: {name}={passed[name]!r} is not supported ({why})")
    if passed.get("revision") is not None and local_path(passed["model_id"], None) is not None:
        raise ValueError(f"{where}: revision={passed['revision']!r} applies to Hub repositories; the adapter is local")
    if extra := sorted(set(passed) - ANY_VALUE - set(ONLY) - {"revision", *OFFLOAD}):
        if fields := [name for name in extra if name in inspect.signature(type(config).__init__).parameters]:
            raise TypeError(f"{where}: {fields} are PiCaConfig fields, which peft would ignore here in favour of the "
                            "file's values; pass config=PiCaConfig(...) to from_pretrained to override the file")
        raise TypeError(f"{where}: unexpected keyword argument(s) {extra} (peft would ignore them)")
    offload = [name for name in OFFLOAD if name in passed]
    if offload and getattr(model, "hf_device_map", None) is None and not (
            offload == ["device_map"] and _is_where_model_is(passed["device_map"], model)):
        raise ValueError(f"{where}: {offload} apply only to a model dispatched with a device_map (peft would ignore them)")


def _is_where_model_is(device_map: Any, model: nn.Module) -> bool:
    """True if ``device_map`` (``"cpu"``, ``0``, a ``torch.device``, ``{"": device}``) names the one device that holds
    every tensor of ``model`` (``"auto"`` and the like ask for a dispatch: False)."""
    device_map = device_map.get("") if isinstance(device_map, dict) and set(device_map) == {""} else device_map
    device_map = f"cuda:{device_map}" if isinstance(device_map, int) and not isinstance(device_map, bool) else device_map
    try:
        device = torch.device(device_map)
    except (RuntimeError, TypeError):
        return False
    tensors = [*model.parameters(), *model.buffers()]
    return bool(tensors) and all(t.device.type == device.type and device.index in (None, t.device.index) for t in tensors)
