"""PEFT integration of PiCa: config, layer, tuner model, registration."""

from .config import PiCaConfig
from .layer import Linear, PiCaLayer
from .model import PiCaModel
from .integration import install as _install_peft_integration
from .registration import PICA_PEFT_TYPE, register

register()
_install_peft_integration()

__all__ = ["PICA_PEFT_TYPE", "Linear", "PiCaConfig", "PiCaLayer", "PiCaModel"]
