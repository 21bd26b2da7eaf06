"""pica: PiCa (Parameter-efficient fine-tuning with Column space projection) as a PEFT method.

``import pica`` registers the method with peft, so ``peft.get_peft_model(model, pica.PiCaConfig())``
and ``peft.PeftModel.from_pretrained(base, path)`` work unchanged.

The maths (:mod:`pica.projector`, :mod:`pica.projector_batch`, :mod:`pica.functional`,
:mod:`pica.sketch`, :mod:`pica.grouping`, :mod:`pica.io`) needs only torch and safetensors: where
peft or transformers is not installed, ``import pica`` skips the registration and those modules
still import; the peft-dependent names (``PiCaConfig``, ``export_lora``, ...) then raise the
``ImportError`` on first use.
"""

from __future__ import annotations

from typing import Any

from .functional import delta_weight, pica_delta
from .fingerprint import weight_fingerprint
from .projector import canonicalize_signs, top_right_singular_vectors
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


try:
    from . import tuner  # noqa: F401  (registers PiCa with peft, installs the load/save integration)
except ModuleNotFoundError as _error:
    if (_error.name or "").split(".")[0] not in ("peft", "transformers"):
        raise
