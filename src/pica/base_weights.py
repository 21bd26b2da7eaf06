"""Base layers whose weight is stored quantised by bitsandbytes: sizes, values, and their layouts.

Supported: ``Linear4bit`` (nf4, fp4; with or without double quantisation; integer or float
``quant_storage``) and ``Linear8bitLt`` (int8 row-wise codes, scales on the ``Int8Params`` or on the
layer's state). Packed storage is never read as a weight: sizes come from the module and values only
through :func:`dequantized`, one layer at a time, in any layout, without changing the layer. Other
quantised layer types (GPTQ, AWQ, HQQ, torchao, ...) are refused by :func:`check_supported`.

On CPUs with AVX512-BF16, bitsandbytes repacks a ``Linear4bit`` in place on its first inference forward
(eval, no grad): codes re-ordered, block scales a transposed bfloat16 tensor, ``quant_state.dtype``/
``nested`` changed (the old values kept as ``original_*``). The codes survive exactly, the scales only to
bfloat16. :func:`guard_quantized_layers` handles the two other effects of that layout: no input gradient
through the packed kernel, and bitsandbytes un-packing the layer (lossily) whenever its state dict is taken.
No ``peft`` import: the tuner, exports and ``pica analyze`` read base weights through this module.
"""

from __future__ import annotations

import copy
import weakref
from typing import Any, Optional

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

__all__ = ["QUANTIZATION_METHODS", "SCHEME_KEYS", "base_shape", "base_weight_out_in", "check_supported",
           "dequantize_4bit", "dequantized", "guard_quantized_layers", "is_cpu_packed", "is_quantized",
           "keep_unpacked", "layer_scheme", "quantized_from_dtype"]

QUANTIZATION_METHODS = ("bitsandbytes_4bit", "bitsandbytes_8bit")
"""Values of ``PiCaConfig.base_quantization["method"]``."""

SCHEME_KEYS = {"bitsandbytes_4bit": ("quant_type", "blocksize", "compress_statistics", "dtype"),
                "bitsandbytes_8bit": ()}
"""Method → the keys (besides ``method`` and ``unquantized_modules``) of its ``base_quantization`` record: what
defines the quantisation (``compress_statistics`` and ``dtype`` as set when the weight was quantised), never a
detail a forward changes."""
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


def is_cpu_packed(module: nn.Module) -> bool:
    """Whether a bitsandbytes 4-bit layer holds its weight in the layout of bitsandbytes's CPU kernel."""
    state = getattr(getattr(module, "weight", None), "quant_state", None)
    return bool(getattr(state, "packing_format_for_cpu", False))


def _original(state: Any, field: str) -> Any:
    """A 4-bit ``QuantState`` field as it was set at quantisation (the packed layout keeps it as ``original_*``)."""
    if getattr(state, "packing_format_for_cpu", False):
        return getattr(state, f"original_{field}")
    return getattr(state, field)


def layer_scheme(module: nn.Module) -> Optional[dict[str, Any]]:
    """The quantisation scheme of one supported quantised layer (JSON-ready), or None if unquantised.

    The same in every layout of the weight (see the module docstring): the values set at quantisation.
    """
    kind = _bnb_kind(module)
    if kind == "bitsandbytes_8bit":
        return {"method": kind} if module.weight.dtype == torch.int8 else None  # has_fp16_weights: float storage
    if kind == "bitsandbytes_4bit":
        state = module.weight.quant_state
        return {"method": kind, "quant_type": state.quant_type, "blocksize": int(state.blocksize),
                "compress_statistics": bool(_original(state, "nested")),
                "dtype": str(_original(state, "dtype")).removeprefix("torch.")}
    return None


def quantized_from_dtype(module: nn.Module) -> torch.dtype:
    """The dtype :func:`dequantized` returns for a quantised layer: 4-bit, the dtype it was quantised from (as
    set at quantisation, whatever the layout); 8-bit codes, float32 (bitsandbytes' de-quantisation)."""
    if _bnb_kind(module) == "bitsandbytes_4bit":
        return _original(module.weight.quant_state, "dtype")
    return torch.float32 if module.weight.dtype == torch.int8 else module.weight.dtype


def dequantize_4bit(codes: torch.Tensor, state: Any, scales_dtype: Optional[torch.dtype]) -> torch.Tensor:
    """De-quantise 4-bit ``codes`` held in any layout, ``(out, in)``, in the dtype quantised from.

    Args:
        codes: the stored tensor (``Params4bit.data``): packed bytes, in bitsandbytes's quantisation
            layout (any ``quant_storage`` dtype) or its CPU-kernel layout.
        state: its ``QuantState``; only read.
        scales_dtype: round the per-block scales to this dtype first (None: use them as stored).
    """
    import bitsandbytes.functional as bnb_functional

    if getattr(state, "packing_format_for_cpu", False):
        if not hasattr(bnb_functional, "_convert_weight_packed_for_cpu_inverse"):
            raise RuntimeError("this bitsandbytes release packs 4-bit CPU weights but has no "
                               "_convert_weight_packed_for_cpu_inverse to read them; use bitsandbytes 0.50")
        scratch = copy.copy(state)  # the inverse rebinds fields of the state it is given: never the layer's
        scratch.original_nested, scratch.original_storage_type = False, None  # codes only: scales are read below
        codes, _ = bnb_functional._convert_weight_packed_for_cpu_inverse(codes, scratch)
        scales = state.absmax.T.reshape(-1).float()  # stored (in/blocksize, out) bf16 → row-major blocks
    elif state.nested:
        scales = bnb_functional.dequantize_blockwise(state.absmax, state.state2)
        scales += state.offset  # as bitsandbytes does it, so that both layouts give the same bits
        scales = scales.float()
    else:
        scales = state.absmax.float()
    if scales_dtype is not None:
        scales = scales.to(scales_dtype).float()
    plain = bnb_functional.QuantState(absmax=scales, shape=state.shape, code=state.code, blocksize=state.blocksize,
                                      quant_type=state.quant_type, dtype=_original(state, "dtype"))
    return bnb_functional.dequantize_4bit(codes.contiguous().view(torch.uint8).reshape(-1, 1), plain)


def dequantized(module: nn.Module, scales_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The values of a bitsandbytes layer's weight, ``(out_features, in_features)``: the one reader.

    Reads every layout (see the module docstring) without changing the layer or its state.

    Args:
        module: a bitsandbytes ``Linear4bit`` or ``Linear8bitLt`` (:func:`is_quantized`).
        scales_dtype: 4-bit only: round each block's scale to this dtype (``torch.bfloat16`` gives the
            same values in every layout); None: the scales as the layer holds them.

    Returns:
        A new tensor in the dtype the weight was quantised from (8-bit: float32), or a ``meta`` tensor
        for a weightless layer; the stored weight itself for an 8-bit layer that keeps float weights.
    """
    weight = module.weight
    if weight.is_meta:
        return torch.empty(module.out_features, module.in_features, device="meta")
    if _bnb_kind(module) == "bitsandbytes_4bit":
        return dequantize_4bit(weight.data, weight.quant_state, scales_dtype).detach()
    if weight.dtype != torch.int8:
        return weight  # 8-bit layer holding float weights (has_fp16_weights=True)
    import bitsandbytes.functional as bnb_functional

    state = getattr(module, "state", None)
    row_scales = weight.SCB if getattr(weight, "SCB", None) is not None else getattr(state, "SCB", None)
    if row_scales is None:
        raise RuntimeError(f"bitsandbytes 8-bit layer {type(module).__name__} holds int8 codes without scales (SCB)")
    return bnb_functional.int8_vectorwise_dequant(weight.data, row_scales.to(weight.device)).detach()


def base_weight_out_in(module: nn.Module) -> torch.Tensor:
    """The base weight in PyTorch ``(out_features, in_features)`` layout, as the layer computes with it.

    A view of the stored weight for ``nn.Linear``/``Conv1D``; a new, de-quantised tensor (in the
    dtype it was quantised from) for bitsandbytes layers (:func:`dequantized`), so callers de-quantise
    one layer at a time.
    """
    if _bnb_kind(module) is not None:
        return dequantized(module)
    weight = module.weight
    return weight.T if isinstance(module, Conv1D) else weight


def _differentiable_output(module: nn.Module, args: tuple, output: torch.Tensor) -> Optional[torch.Tensor]:
    """Forward hook: the output of a CPU-packed 4-bit layer, differentiable with respect to its input.

    bitsandbytes's packed kernel has no autograd formula: gradients stop at the layer with no error
    (every adapter below it would train on a wrong gradient). When autograd needs the input's
    gradient, the output is recomputed as ``x Wᵀ + b`` with ``W`` read from the packed codes
    (:func:`dequantized`), as bitsandbytes's unpacked layout computes it in training; otherwise the
    kernel's output stands.

    Args: ``args[0]`` x ``(..., in_features)``. Returns ``(..., out_features)`` in ``x``'s dtype, or None.
    """
    x = args[0] if args else None
    if not (isinstance(x, torch.Tensor) and x.requires_grad and torch.is_grad_enabled() and is_cpu_packed(module)):
        return None
    compute = module.compute_dtype or x.dtype
    bias = None if module.bias is None else module.bias.to(compute)
    return torch.nn.functional.linear(x.to(compute), dequantized(module).to(compute), bias).to(x.dtype)


_PACKED_BEFORE_SAVE: "weakref.WeakKeyDictionary[nn.Module, tuple[torch.Tensor, dict[str, Any]]]" = weakref.WeakKeyDictionary()


def _remember_layout(module: nn.Module, prefix: str, keep_vars: bool) -> None:
    """``state_dict`` pre-hook: note a CPU-packed layer's storage before bitsandbytes un-packs it to save."""
    if is_cpu_packed(module):
        _PACKED_BEFORE_SAVE[module] = (module.weight.data, dict(vars(module.weight.quant_state)))


def _restore_layout(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """``state_dict`` post-hook: put the packed storage back (the saved entries keep bitsandbytes's un-packed copy).

    bitsandbytes's un-packing is lossy (scales stay bfloat16; without double quantisation they stay
    transposed, so the layer's next outputs would change by percents): the layer must not keep it.
    """
    remembered = _PACKED_BEFORE_SAVE.pop(module, None)
    if remembered is not None:
        data, fields = remembered
        state = module.weight.quant_state
        module.weight.data = data
        vars(state).clear()
        vars(state).update(fields)


def guard_quantized_layers(model: nn.Module) -> None:
    """Make every bitsandbytes 4-bit layer of ``model`` safe in its CPU-packed layout (idempotent).

    ``state_dict()`` leaves the layer as it was (peft's save, Trainer checkpoints and exports take the
    whole model's state dict, and bitsandbytes un-packs in place to save it, see :func:`_restore_layout`),
    and autograd gets the input's gradient through it (:func:`_differentiable_output`).
    """
    for module in model.modules():
        if _bnb_kind(module) == "bitsandbytes_4bit" and _remember_layout not in module._state_dict_pre_hooks.values():
            module.register_state_dict_pre_hook(_remember_layout)
            module.register_state_dict_post_hook(_restore_layout)
            module.register_forward_hook(_differentiable_output)


def keep_unpacked(model: nn.Module) -> int:
    """Stop bitsandbytes repacking ``model``'s 4-bit layers for its CPU inference kernel; returns how many.

    For training runs that evaluate between steps: the packed kernel has no input gradient, so a layer
    packed by an evaluation would stop the gradient of every adapter below it from then on (PiCa's
    model's layers are guarded, :func:`guard_quantized_layers`; other methods' are not). Layers packed
    already stay packed.
    """
    four_bit = [module for module in model.modules() if _bnb_kind(module) == "bitsandbytes_4bit"]
    for module in four_bit:
        module.support_avx512bf16_for_cpu = False
    return len(four_bit)
