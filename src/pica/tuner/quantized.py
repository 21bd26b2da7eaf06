"""Base layers whose weight is stored quantised: sizes, de-quantisation, and the quantisation record.

Supported: bitsandbytes ``Linear4bit`` (nf4, fp4; with or without double quantisation) and
``Linear8bitLt`` (int8 row-wise codes). Their packed storage is never read as a weight: sizes come
from the module (``out_features``, ``in_features``) and values only through de-quantisation
(:func:`base_weight_out_in`), one layer at a time.

An adapter trained on a quantised base records the scheme in ``PiCaConfig.base_quantization``
(:func:`quantization_record`). Loaded onto the full-precision weights the base was quantised from,
each ``P`` and fingerprint is taken from those weights quantised again by the recorded scheme
(:func:`requantized_weight`): bitsandbytes quantisation is deterministic, so that reproduces the
de-quantised weight the adapter was trained on exactly, while a different model of the same shapes
still differs by O(1) in the fingerprint.

Other quantised layer types (GPTQ, AWQ, HQQ, torchao, quanto, ...) are refused by
:func:`check_supported`, naming the module and its type.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

logger = logging.getLogger(__name__)

__all__ = ["QUANTIZATION_METHODS", "SCHEME_KEYS", "adapter_view", "base_shape", "base_weight_out_in", "check_supported",
           "is_quantized", "layer_scheme", "quantization_record", "requantized_weight", "target_schemes"]

QUANTIZATION_METHODS = ("bitsandbytes_4bit", "bitsandbytes_8bit")
"""Values of ``PiCaConfig.base_quantization["method"]``."""

SCHEME_KEYS = {"bitsandbytes_4bit": ("quant_type", "blocksize", "compress_statistics", "dtype"),
                "bitsandbytes_8bit": ()}
"""Method → the keys (besides ``method`` and ``unquantized_modules``) of its ``base_quantization`` record."""
_QUANTISED_ATTRIBUTES = ("qweight", "W_q", "qzeros", "weight_packed", "quant_state", "SCB")


def _bnb_kind(module: nn.Module) -> Optional[str]:
    """``"bitsandbytes_4bit"``/``"bitsandbytes_8bit"`` for a bitsandbytes linear layer, else None."""
    if not type(module).__module__.startswith("bitsandbytes."):
        return None
    weight_class = type(getattr(module, "weight", None)).__name__
    if weight_class == "Params4bit":
        return "bitsandbytes_4bit"
    if weight_class == "Int8Params":
        return "bitsandbytes_8bit"
    return None


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` is a supported quantised base layer (bitsandbytes 4-bit or 8-bit linear)."""
    return _bnb_kind(module) is not None


def _looks_quantized(module: nn.Module) -> bool:
    """Whether a layer that is not a supported quantised type stores its weight in a quantised form."""
    weight = getattr(module, "weight", None)
    if any(hasattr(module, attribute) for attribute in _QUANTISED_ATTRIBUTES):
        return True
    if type(module).__module__.split(".")[0] in ("bitsandbytes", "auto_gptq", "gptqmodel", "awq", "hqq", "optimum",
                                                 "torchao", "quanto", "eetq", "aqlm", "fbgemm_gpu", "compressed_tensors"):
        return True
    if isinstance(weight, torch.Tensor):
        return (not weight.is_floating_point() or weight.element_size() < 2  # int codes, float8
                or type(weight) not in (nn.Parameter, torch.Tensor))
    return False


def check_supported(targets: dict[str, nn.Module]) -> None:
    """Refuse quantised layer types that PiCa cannot read, naming each module and its type.

    Args:
        targets: module name → base layer of every target.

    Raises:
        TypeError: a target stores a quantised weight of an unsupported kind (GPTQ, AWQ, HQQ, torchao, ...).
    """
    refused = [f"{name} ({type(module).__module__}.{type(module).__name__})" for name, module in targets.items()
               if not is_quantized(module) and _looks_quantized(module)]
    if refused:
        raise TypeError(f"PiCa supports quantised base layers of bitsandbytes (Linear4bit nf4/fp4, Linear8bitLt) "
                        f"only; these targets are quantised in another way: {refused[:8]}. Load the model "
                        "unquantised or with BitsAndBytesConfig, or exclude them with exclude_modules.")


def base_shape(module: nn.Module) -> tuple[int, int]:
    """``(out_features, in_features)`` of a base layer, read from the module, never from packed storage."""
    if is_quantized(module):
        return module.out_features, module.in_features
    if isinstance(module, Conv1D):
        return tuple(module.weight.shape[::-1])  # Conv1D stores (in_features, out_features)
    if isinstance(module, nn.Linear):
        return tuple(module.weight.shape)
    raise TypeError(f"PiCa supports nn.Linear and transformers Conv1D, got {type(module).__name__}")


def layer_scheme(module: nn.Module) -> Optional[dict[str, Any]]:
    """The quantisation scheme of one supported quantised layer (JSON-ready), or None if unquantised."""
    kind = _bnb_kind(module)
    if kind == "bitsandbytes_8bit":
        return {"method": kind} if module.weight.dtype == torch.int8 else None  # has_fp16_weights: float storage
    if kind == "bitsandbytes_4bit":
        state = module.weight.quant_state
        return {"method": kind, "quant_type": state.quant_type, "blocksize": int(state.blocksize),
                "compress_statistics": state.nested, "dtype": str(state.dtype).removeprefix("torch.")}
    return None


def quantization_record(targets: dict[str, nn.Module]) -> Optional[dict[str, Any]]:
    """``PiCaConfig.base_quantization`` for a new adapter on ``targets`` (None if none is quantised).

    The scheme shared by every quantised target, plus ``unquantized_modules``: the targets that were
    left in full precision (e.g. by ``llm_int8_skip_modules``).

    Raises:
        ValueError: the targets are quantised with different schemes (naming two modules).
    """
    schemes = {name: layer_scheme(module) for name, module in targets.items()}
    quantized = {name: scheme for name, scheme in schemes.items() if scheme is not None}
    if not quantized:
        return None
    first_name, first = next(iter(quantized.items()))
    for name, scheme in quantized.items():
        if scheme != first:
            raise ValueError(f"PiCa targets are quantised with different schemes: {first_name} {first}, {name} {scheme}; "
                             "one adapter needs one scheme")
    return {**first, "unquantized_modules": sorted(name for name, scheme in schemes.items() if scheme is None)}


def base_weight_out_in(module: nn.Module) -> torch.Tensor:
    """The base weight in PyTorch ``(out_features, in_features)`` layout.

    A view of the stored weight for ``nn.Linear``/``Conv1D``; a new, de-quantised tensor (in the
    dtype it was quantised from) for bitsandbytes layers, so callers de-quantise one layer at a time.
    """
    kind = _bnb_kind(module)
    if kind is None:
        weight = module.weight
        return weight.T if isinstance(module, Conv1D) else weight
    if module.weight.is_meta:
        return torch.empty(module.out_features, module.in_features, device="meta")
    if kind == "bitsandbytes_8bit" and module.weight.dtype != torch.int8:
        return module.weight  # 8-bit layer holding float weights (has_fp16_weights=True)
    from peft.utils.integrations import dequantize_bnb_weight

    return dequantize_bnb_weight(module.weight, state=getattr(module, "state", None)).detach()  # (out, in)


def requantized_weight(weight: torch.Tensor, scheme: dict[str, Any]) -> torch.Tensor:
    """``weight`` quantised by ``scheme`` (a :func:`layer_scheme`) and de-quantised again, ``(out, in)``.

    Exactly what bitsandbytes stores when it quantises ``weight`` at load time, so on the weights a
    quantised base came from it reproduces that base's de-quantised weight bit for bit.

    Raises:
        ValueError: an unknown method (naming it).
    """
    import bitsandbytes.functional as bnb_functional

    method = scheme.get("method")
    if method == "bitsandbytes_8bit":  # Int8Params: fp16, then row-wise absmax int8 codes
        codes, row_scales, _ = bnb_functional.int8_vectorwise_quant(weight.detach().to(torch.float16).contiguous())
        return bnb_functional.int8_vectorwise_dequant(codes, row_scales)
    if method == "bitsandbytes_4bit":
        source = weight.detach().to(getattr(torch, scheme["dtype"])).contiguous()
        packed, state = bnb_functional.quantize_4bit(source, blocksize=scheme["blocksize"],
                                                     compress_statistics=scheme["compress_statistics"],
                                                     quant_type=scheme["quant_type"])
        return bnb_functional.dequantize_4bit(packed, state)
    raise ValueError(f"PiCaConfig.base_quantization: unknown method {method!r}; known: {QUANTIZATION_METHODS}")


def target_schemes(record: Optional[dict[str, Any]], targets: dict[str, nn.Module]) -> dict[str, dict[str, Any]]:
    """Module name → the scheme to quantise its full-precision weight by, for an adapter's ``record``.

    Empty if the adapter was trained on an unquantised base (``record`` None). A target that is
    quantised here must be quantised exactly as recorded; one that the record lists as quantised
    but is in full precision here gets the recorded scheme (the serving path).

    Raises:
        ValueError: a target is quantised differently from the record, or quantised here but recorded
            as unquantised (naming the modules and both schemes).
    """
    if record is None:
        return {}
    skipped = set(record.get("unquantized_modules", ()))
    scheme = {key: value for key, value in record.items() if key != "unquantized_modules"}
    result, conflicts = {}, []
    for name, module in targets.items():
        here = layer_scheme(module)
        expected = None if name in skipped else scheme
        if here is not None and here != expected:
            conflicts.append(f"{name}: quantised here as {here}, trained {'unquantised' if expected is None else 'as ' + str(expected)}")
        elif here is None and expected is not None:
            result[name] = expected
    if conflicts:
        raise ValueError(f"PiCaConfig.base_quantization does not match this model at {len(conflicts)} module(s): "
                         f"{'; '.join(conflicts[:4])}. Load the base quantised as it was for training, or unquantised.")
    return result


def adapter_view(module: nn.Module, scheme: Optional[dict[str, Any]]) -> torch.Tensor:
    """The base weight as the adapter was trained on it, ``(out_features, in_features)``.

    :func:`base_weight_out_in`, quantised and de-quantised by ``scheme`` when given (a full-precision
    base of an adapter trained on its quantised form, see :func:`target_schemes`).
    """
    weight = base_weight_out_in(module)
    if scheme is None or weight.is_meta:
        return weight
    return requantized_weight(weight, scheme)
