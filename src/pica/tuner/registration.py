"""Everything that registers PiCa with ``peft`` lives here (one place to fix on peft upgrades).

peft 0.21 keeps a ``PeftType`` str-enum and four mapping dicts filled by ``register_peft_method``.
We add the enum member ``PICA`` (``aenum.extend_enum``) and register the config/tuner classes once;
importing ``pica`` twice (or reloading) is a no-op.
"""

from __future__ import annotations

import aenum
from peft.utils.peft_types import PeftType

__all__ = ["PICA_NAME", "PICA_PEFT_TYPE", "PICA_PREFIX", "register"]

PICA_NAME = "pica"
PICA_PREFIX = "pica_"

if not hasattr(PeftType, PICA_NAME.upper()):
    aenum.extend_enum(PeftType, PICA_NAME.upper(), PICA_NAME.upper())
PICA_PEFT_TYPE: PeftType = getattr(PeftType, PICA_NAME.upper())


def register() -> None:
    """Register PiCa's config and tuner with peft (idempotent)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method

    from .config import PiCaConfig
    from .model import PiCaModel

    registered_config = PEFT_TYPE_TO_CONFIG_MAPPING.get(PICA_PEFT_TYPE)
    if registered_config is not None:
        if registered_config.__name__ != PiCaConfig.__name__ or PEFT_TYPE_TO_TUNER_MAPPING.get(PICA_PEFT_TYPE) is None:
            raise RuntimeError(f"peft already has a different method registered as {PICA_PEFT_TYPE!r}")
        return
    register_peft_method(name=PICA_NAME, config_cls=PiCaConfig, model_cls=PiCaModel, prefix=PICA_PREFIX)
