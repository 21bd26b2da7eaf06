"""Every peft/transformers function that pica wraps, and why (peft 0.21.2 has no hook for these).

Each wrapper acts only when a PiCa adapter is involved and otherwise calls the original unchanged;
:func:`install` is idempotent (a wrapper remembers the original in ``__pica_original__``) and
:func:`uninstall` restores the originals. If peft changes these functions, this module is the one
place to fix.

==========================================  =========================================================
wrapped                                     gap it covers
==========================================  =========================================================
``PeftModel.save_pretrained``               atomic save: peft writes into the target directory in
                                            place, so a crash can leave a torn adapter. Here peft
                                            writes into a staging directory whose files are then
                                            moved in (:func:`pica.io.atomic_directory_update`).
``PeftModel.from_pretrained``,              validate the files before any layer is injected, and
``PeftModel.load_adapter``                  restore the model exactly on any error: peft injects
                                            layers before it reads the weights and has no
                                            validation or rollback hook; peft's own config parse is
                                            skipped by handing ``from_pretrained`` the config read once
                                            (:func:`loading.load_checked`).
``peft.peft_model.load_peft_weights``       hand peft the tensors validated above instead of letting
                                            it read the file again (one read, safetensors only; peft
                                            would fall back to a pickled ``adapter_model.bin``).
``PeftAdapterMixin.load_adapter``           refuse PiCa adapters with a pointer to
(transformers)                              ``PeftModel.from_pretrained`` (transformers injects through
                                            peft's ``inject_adapter_in_model``, which keeps no tuner,
                                            where PiCa's ``M`` lives).
==========================================  =========================================================
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from typing import Any

import peft.peft_model
from peft import PeftModel
from peft.utils.constants import CONFIG_NAME

from ..io import atomic_directory_update
from .config import PiCaConfig
from .loading import call_arguments, load_checked, refuse_transformers_load_adapter, validated_weights

logger = logging.getLogger(__name__)

__all__ = ["install", "is_installed", "uninstall"]

_ORIGINAL = "__pica_original__"


def _save_pretrained(original: Callable, self: PeftModel, *args: Any, **kwargs: Any) -> None:
    values = call_arguments(original, self, *args, **kwargs)
    values.pop("self")
    save_directory = values["save_directory"]
    selected = values.get("selected_adapters") or list(self.peft_config)
    pica = any(isinstance(self.peft_config.get(name), PiCaConfig) for name in selected)
    if not pica or not values.get("is_main_process", True) or os.path.isfile(save_directory):
        return original(self, *args, **kwargs)
    if not values.get("safe_serialization", True):
        logger.warning("PiCa adapters are saved as safetensors only (no pickle); ignoring safe_serialization=False")
        values["safe_serialization"] = True
    with atomic_directory_update(save_directory, seed_files=("README.md",), last=(CONFIG_NAME,)) as staging:
        return original(self, **{**values, "save_directory": str(staging)})


def _targets() -> list[tuple[Any, str, Callable, bool]]:
    """(owner, attribute, wrapper body, is_classmethod) for every wrapped callable."""
    from transformers.integrations.peft import PeftAdapterMixin

    return [
        (PeftModel, "save_pretrained", _save_pretrained, False),
        (PeftModel, "from_pretrained", load_checked, True),
        (PeftModel, "load_adapter", load_checked, False),
        (peft.peft_model, "load_peft_weights", validated_weights, False),
        (PeftAdapterMixin, "load_adapter", refuse_transformers_load_adapter, False),
    ]


def _current(owner: Any, attribute: str, is_classmethod: bool) -> Callable:
    raw = vars(owner)[attribute] if isinstance(owner, type) else getattr(owner, attribute)
    return raw.__func__ if is_classmethod else raw


def is_installed() -> bool:
    """True if every wrapper is in place."""
    return all(hasattr(_current(owner, name, cm), _ORIGINAL) for owner, name, _, cm in _targets())


def install() -> None:
    """Install the wrappers (idempotent: a wrapped callable is never wrapped twice)."""
    for owner, attribute, body, is_classmethod in _targets():
        original = _current(owner, attribute, is_classmethod)
        if hasattr(original, _ORIGINAL):
            continue
        wrapper = _wrap(body, original)
        setattr(owner, attribute, classmethod(wrapper) if is_classmethod else wrapper)


def _wrap(body: Callable, original: Callable) -> Callable:
    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return body(original, *args, **kwargs)

    setattr(wrapper, _ORIGINAL, original)
    return wrapper


def uninstall() -> None:
    """Put the original peft/transformers callables back."""
    for owner, attribute, _, is_classmethod in _targets():
        current = _current(owner, attribute, is_classmethod)
        original = getattr(current, _ORIGINAL, None)
        if original is not None:
            setattr(owner, attribute, classmethod(original) if is_classmethod else original)
