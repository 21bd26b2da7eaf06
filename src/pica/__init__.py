"""pica: PiCa (Parameter-efficient fine-tuning with Column space projection) as a PEFT method.

``import pica`` registers the method with peft, so ``peft.get_peft_model(model, pica.PiCaConfig())``
and ``peft.PeftModel.from_pretrained(base, path)`` work unchanged.
"""

from .export import export_lora, export_merged
from .functional import delta_weight, pica_delta
from .projector import canonicalize_signs, top_right_singular_vectors, weight_fingerprint
from .projector_batch import top_right_singular_vectors_many
from .tuner import PICA_PEFT_TYPE, PiCaConfig, PiCaLayer, PiCaModel

__version__ = "0.1.0"

__all__ = [
    "PICA_PEFT_TYPE",
    "PiCaConfig",
    "PiCaLayer",
    "PiCaModel",
    "__version__",
    "canonicalize_signs",
    "delta_weight",
    "export_lora",
    "export_merged",
    "pica_delta",
    "top_right_singular_vectors",
    "top_right_singular_vectors_many",
    "weight_fingerprint",
]
