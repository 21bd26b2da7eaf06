"""PEFT integration of PiCa: config, layer, tuner model; importing it registers PiCa with peft."""

from .config import PiCaConfig
from .integration import install as _install_peft_integration
from .layer import Linear, PiCaLayer
from .model import PiCaModel
from .peft_type import PICA_PEFT_TYPE
from .registration import register

register()
_install_peft_integration()

__all__ = ["PICA_PEFT_TYPE", "Linear", "PiCaConfig", "PiCaLayer", "PiCaModel"]
