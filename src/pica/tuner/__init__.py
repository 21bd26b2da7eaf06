"""PEFT integration of PiCa: config, layer, tuner model, registration."""

from .config import PiCaConfig
from .layer import Linear, PiCaLayer
from .model import PiCaModel
from .registration import PICA_PEFT_TYPE, register

register()

__all__ = ["PICA_PEFT_TYPE", "Linear", "PiCaConfig", "PiCaLayer", "PiCaModel"]
