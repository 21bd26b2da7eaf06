"""Every peft/transformers function pica wraps, and the gap each covers (peft 0.21.2 has no hook for these).

Each calls the original unchanged unless a PiCa adapter is involved; (un)installed idempotently by :mod:`pica.wrapping`.

====================================  ===============================================================================
wrapped                               gap it covers
====================================  ===============================================================================
``PeftModel.save_pretrained``         atomic save: peft writes in place (a crash tears the adapter); here into a
                                      staging directory moved in whole (:func:`pica.io.atomic_directory_update`)
``PeftModel.from_pretrained``,        peft injects before it reads the weights, with no validation or rollback hook:
``PeftModel.load_adapter``            validate first, restore on error, one read (:func:`.loading.load_checked`)
``peft.peft_model.load_peft_weights`` hand peft the tensors validated above: no second read, no pickled ``.bin``
``PeftAdapterMixin.load_adapter``     refuse PiCa adapters: transformers injects with ``inject_adapter_in_model``,
(transformers)                        which keeps no tuner, where M lives; point to ``PeftModel.from_pretrained``
====================================  ===============================================================================
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import peft.peft_model
from peft import PeftModel
from peft.utils.constants import CONFIG_NAME

from ..io import atomic_directory_update
from ..load_arguments import call_arguments
from ..wrapping import Target, is_wrapped, unwrap, wrap
from .config import PiCaConfig
from .loading import load_checked, refuse_transformers_load_adapter, validated_weights

logger = logging.getLogger(__name__)

__all__ = ["install", "is_installed", "uninstall"]


def _save_pretrained(original: Callable, self: PeftModel, *args: Any, **kwargs: Any) -> None:
    values = call_arguments(original, self, *args, **kwargs)
    pica = any(isinstance(self.peft_config.get(name), PiCaConfig)
               for name in values.get("selected_adapters") or list(self.peft_config))
    if not pica or not values.get("is_main_process", True) or os.path.isfile(values["save_directory"]):
        return original(self, *args, **kwargs)
    if not values.get("safe_serialization", True):
        logger.warning("PiCa adapters are saved as safetensors only (no pickle); ignoring safe_serialization=False")
    with atomic_directory_update(values["save_directory"], seed_files=("README.md",), last=(CONFIG_NAME,)) as staging:
        return original(self, **{**values, "save_directory": str(staging), "safe_serialization": True})


def _targets() -> list[Target]:
    from transformers.integrations.peft import PeftAdapterMixin

    return [(PeftModel, "save_pretrained", _save_pretrained), (PeftModel, "from_pretrained", load_checked),
            (PeftModel, "load_adapter", load_checked), (peft.peft_model, "load_peft_weights", validated_weights),
            (PeftAdapterMixin, "load_adapter", refuse_transformers_load_adapter)]


def is_installed() -> bool:
    """True if every wrapper is in place."""
    return is_wrapped(_targets())


def install() -> None:
    """Install the wrappers (idempotent)."""
    wrap(_targets())


def uninstall() -> None:
    """Put the original peft/transformers callables back."""
    unwrap(_targets())
