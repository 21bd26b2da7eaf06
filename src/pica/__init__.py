"""pica: PiCa (Parameter-efficient fine-tuning with Column space projection) as a PEFT method.

``import pica`` registers the method with peft, so ``peft.get_peft_model(model, pica.PiCaConfig())``
and ``peft.PeftModel.from_pretrained(base, path)`` work unchanged: at once if peft is already
imported, else when peft is first imported (:mod:`pica.peft_import_hook`).

The maths (:mod:`pica.projector`, :mod:`pica.projector_batch`, :mod:`pica.functional`,
:mod:`pica.fingerprint`, :mod:`pica.sketch`, :mod:`pica.grouping`, :mod:`pica.io`) needs only torch
and safetensors, and importing it imports neither peft nor transformers. The peft-dependent names
(``PiCaConfig``, ``export_lora``, ...) are imported on first use.
"""

from __future__ import annotations

from typing import Any

from .functional import delta_weight, pica_delta
from .fingerprint import weight_fingerprint
from .projector import canonicalize_signs, top_right_singular_vectors
from .peft_import_hook import register_when_peft_is_imported
from .projector_batch import top_right_singular_vectors_many

__version__ = "0.1.0"

_LAZY = {  # name → module that defines it (imported on first use: it needs peft and transformers)
    "PICA_PEFT_TYPE": "tuner", "PiCaConfig": "tuner", "PiCaLayer": "tuner", "PiCaModel": "tuner",
    "export_lora": "export", "export_merged": "export",
}

__all__ = [  # noqa: F822  (the first six are resolved by __getattr__)
    "PICA_PEFT_TYPE", "PiCaConfig", "PiCaLayer", "PiCaModel", "export_lora", "export_merged",
    "__version__", "canonicalize_signs", "delta_weight", "pica_delta", "top_right_singular_vectors",
    "top_right_singular_vectors_many", "weight_fingerprint",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'pica' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)


register_when_peft_is_imported()
