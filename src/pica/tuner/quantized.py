"""Base layers whose weight is stored quantised: sizes, de-quantisation, and the quantisation record.

Supported: bitsandbytes ``Linear4bit`` (nf4, fp4; with or without double quantisation; integer or
float ``quant_storage``) and ``Linear8bitLt`` (int8 row-wise codes, scales on the ``Int8Params`` or on
the layer's state). Their packed storage is never read as a weight: sizes come from the module
(``out_features``, ``in_features``) and values only through :func:`dequantized`, one layer at a time,
whatever layout bitsandbytes holds the weight in, and without changing it.

**Layouts of a 4-bit weight.** On CPUs with AVX512-BF16, bitsandbytes repacks a ``Linear4bit`` in place
on its first inference forward (eval mode, no grad) for its CPU kernel: the codes are re-ordered, the
per-block scales (``absmax``, de-quantised first if doubly quantised) become a transposed bfloat16
tensor, and ``quant_state.dtype``/``nested`` change (the old values are kept in ``original_dtype``/
``original_nested``). The codes survive exactly, the scales only to bfloat16. So ``P`` and fingerprints
read the weight with its block scales rounded to bfloat16 in *every* layout (``block_scales:
"bfloat16"`` in the record): the same bits before and after a repack, and within ``2**-9`` of each
block's scale of the de-quantised weight. :func:`base_weight_out_in` reads what the layer computes
with (its stored scales), for exports. Two more effects of the packed layout are handled by
:func:`guard_quantized_layers`, installed on every 4-bit layer of a model PiCa adapts: the packed
forward has no input gradient, and bitsandbytes un-packs the layer in place (lossily) whenever its
state dict is taken.

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

import copy
import logging
import weakref
from typing import Any, Optional

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

logger = logging.getLogger(__name__)

__all__ = ["QUANTIZATION_METHODS", "SCHEME_KEYS", "adapter_view", "base_shape", "base_weight_out_in",
           "check_supported", "dequantized", "guard_quantized_layers", "is_cpu_packed", "is_quantized", "keep_unpacked",
           "layer_scheme", "quantization_record", "quantized_from_dtype", "requantized_weight", "target_schemes"]

QUANTIZATION_METHODS = ("bitsandbytes_4bit", "bitsandbytes_8bit")
"""Values of ``PiCaConfig.base_quantization["method"]``."""

SCHEME_KEYS = {"bitsandbytes_4bit": ("quant_type", "blocksize", "compress_statistics", "dtype"),
                "bitsandbytes_8bit": ()}
"""Method → the keys (besides ``method`` and ``unquantized_modules``) of its ``base_quantization`` record: what
defines the quantisation (``compress_statistics`` and ``dtype`` as set when the weight was quantised), never a
detail a forward changes."""
BLOCK_SCALES = "bfloat16"
"""``base_quantization["block_scales"]`` of new 4-bit records: ``P`` and fingerprints were read with the block
scales rounded to this dtype (see the module docstring). Records without the key (pica 0.1) read them as stored."""
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


def _defining(scheme: dict[str, Any]) -> dict[str, Any]:
    """The keys of a scheme or record that define the quantisation (``method`` and :data:`SCHEME_KEYS`)."""
    return {key: scheme[key] for key in ("method", *SCHEME_KEYS[scheme["method"]])}


def quantization_record(targets: dict[str, nn.Module]) -> Optional[dict[str, Any]]:
    """``PiCaConfig.base_quantization`` for a new adapter on ``targets`` (None if none is quantised).

    The scheme shared by every quantised target, plus ``unquantized_modules``: the targets that were
    left in full precision (e.g. by ``llm_int8_skip_modules``), and for 4-bit schemes ``block_scales``.

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
    extra = {"block_scales": BLOCK_SCALES} if first["method"] == "bitsandbytes_4bit" else {}
    return {**first, **extra, "unquantized_modules": sorted(name for name, scheme in schemes.items() if scheme is None)}


def quantized_from_dtype(module: nn.Module) -> torch.dtype:
    """The dtype :func:`dequantized` returns for a quantised layer: 4-bit, the dtype it was quantised from (as
    set at quantisation, whatever the layout); 8-bit codes, float32 (bitsandbytes' de-quantisation)."""
    if _bnb_kind(module) == "bitsandbytes_4bit":
        return _original(module.weight.quant_state, "dtype")
    return torch.float32 if module.weight.dtype == torch.int8 else module.weight.dtype


def _dequantize_4bit(codes: torch.Tensor, state: Any, scales_dtype: Optional[torch.dtype]) -> torch.Tensor:
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
        return _dequantize_4bit(weight.data, weight.quant_state, scales_dtype).detach()
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


def requantized_weight(weight: torch.Tensor, scheme: dict[str, Any]) -> torch.Tensor:
    """``weight`` quantised by ``scheme`` (a record or :func:`layer_scheme`) and read back, ``(out, in)``.

    bitsandbytes quantises deterministically, so on the weights a quantised base came from this
    reproduces what ``P`` and the fingerprints read from that base (:func:`adapter_view`), bit for bit.

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
        return _dequantize_4bit(packed, state, _scales_dtype(scheme))
    raise ValueError(f"PiCaConfig.base_quantization: unknown method {method!r}; known: {QUANTIZATION_METHODS}")


def _scales_dtype(record: Optional[dict[str, Any]]) -> Optional[torch.dtype]:
    """The dtype ``P`` and fingerprints round 4-bit block scales to under ``record`` (None: as stored)."""
    return getattr(torch, record["block_scales"]) if record and "block_scales" in record else None


def target_schemes(record: Optional[dict[str, Any]], targets: dict[str, nn.Module]) -> dict[str, dict[str, Any]]:
    """Module name → the record to read its weight by, for an adapter's ``record``.

    Empty if the adapter was trained on an unquantised base (``record`` None). A target that is
    quantised here must be quantised as recorded (the keys that define the scheme; never a detail of
    the layout); it maps to the record (how to read it). One that the record lists as quantised but is
    in full precision here also maps to the record, and is quantised by it first (the serving path).

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
        expected = None if name in skipped else _defining(scheme)
        if here is not None and here != expected:
            conflicts.append(f"{name}: quantised here as {here}, trained {'unquantised' if expected is None else 'as ' + str(expected)}")
        elif expected is not None:
            result[name] = scheme
    if conflicts:
        raise ValueError(f"PiCaConfig.base_quantization does not match this model at {len(conflicts)} module(s): "
                         f"{'; '.join(conflicts[:4])}. Load the base quantised as it was for training, or unquantised.")
    return result


def adapter_view(module: nn.Module, scheme: Optional[dict[str, Any]]) -> torch.Tensor:
    """The base weight as ``P`` and fingerprints read it, ``(out_features, in_features)``.

    For a quantised layer, :func:`dequantized` with the block scales of ``scheme`` (the adapter's
    record). For a full-precision layer, :func:`base_weight_out_in`, quantised and read back by
    ``scheme`` when given (a full-precision base of an adapter trained quantised, see :func:`target_schemes`).
    """
    if is_quantized(module):
        return dequantized(module, _scales_dtype(scheme))
    weight = base_weight_out_in(module)
    if scheme is None or weight.is_meta:
        return weight
    return requantized_weight(weight, scheme)


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
