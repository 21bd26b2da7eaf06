"""PEFT integration of PiCa. Importing it registers PiCa with peft (idempotent; another method registered as
``PICA`` is an error) and installs the wrappers of :mod:`pica.tuner.integration`."""

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import register_peft_method

from .config import PICA_NAME, PICA_PEFT_TYPE, PICA_PREFIX, PiCaConfig
from .integration import install as _install_peft_integration
from .layer import Linear, PiCaLayer
from .model import PiCaModel

__all__ = ["PICA_PEFT_TYPE", "Linear", "PiCaConfig", "PiCaLayer", "PiCaModel", "register"]


def register() -> None:
    """Register PiCa's config and tuner with peft (idempotent).

    Raises:
        RuntimeError: peft already has another method registered as ``PICA``.
    """
    registered = PEFT_TYPE_TO_CONFIG_MAPPING.get(PICA_PEFT_TYPE)
    if registered is None:
        register_peft_method(name=PICA_NAME, config_cls=PiCaConfig, model_cls=PiCaModel, prefix=PICA_PREFIX)
    elif registered.__name__ != PiCaConfig.__name__ or PEFT_TYPE_TO_TUNER_MAPPING.get(PICA_PEFT_TYPE) is None:
        raise RuntimeError(f"peft already has a different method registered as {PICA_PEFT_TYPE!r}")


register()
_install_peft_integration()
