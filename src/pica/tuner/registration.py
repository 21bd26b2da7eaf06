"""Registering PiCa's config and tuner with ``peft`` (one place to fix on peft upgrades).

peft 0.21 fills four mapping dicts in ``register_peft_method``; registering twice (a second import
or a reload) is a no-op, and a different method already registered under ``PICA`` is an error.
"""

from __future__ import annotations

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import register_peft_method

from .config import PiCaConfig
from .model import PiCaModel
from .peft_type import PICA_NAME, PICA_PEFT_TYPE, PICA_PREFIX

__all__ = ["PICA_PEFT_TYPE", "register"]


def register() -> None:
    """Register PiCa's config and tuner with peft (idempotent).

    Raises:
        RuntimeError: peft already has another method registered as ``PICA``.
    """
    registered_config = PEFT_TYPE_TO_CONFIG_MAPPING.get(PICA_PEFT_TYPE)
    if registered_config is not None:
        if registered_config.__name__ != PiCaConfig.__name__ or PEFT_TYPE_TO_TUNER_MAPPING.get(PICA_PEFT_TYPE) is None:
            raise RuntimeError(f"peft already has a different method registered as {PICA_PEFT_TYPE!r}")
        return
    register_peft_method(name=PICA_NAME, config_cls=PiCaConfig, model_cls=PiCaModel, prefix=PICA_PREFIX)
