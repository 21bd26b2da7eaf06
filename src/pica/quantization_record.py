"""The quantisation record of an adapter (``PiCaConfig.base_quantization``) and how ``P`` reads weights by it.
No ``peft`` import.

An adapter trained on a bitsandbytes-quantised base (:mod:`pica.base_weights`) records the scheme
(:func:`quantization_record`). ``P`` and fingerprints read a 4-bit weight with its block scales rounded
to bfloat16 (``block_scales: "bfloat16"``), so every layout bitsandbytes keeps gives the same bits; records
of pica 0.1 lack the key and read the scales as stored. Loaded onto the full-precision weights the base was
quantised from, each ``P`` and fingerprint is taken from those weights quantised again by the record
(:func:`requantized_weight`): bitsandbytes quantises deterministically, so that reproduces the weight the
adapter was trained on exactly, while another model of the same shapes differs by O(1) in the fingerprint.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from .base_weights import (
    QUANTIZATION_METHODS,
    SCHEME_KEYS,
    base_weight_out_in,
    dequantize_4bit,
    dequantized,
    is_quantized,
    layer_scheme,
)

__all__ = ["BLOCK_SCALES", "adapter_view", "check_record", "quantization_distances", "quantization_record",
           "requantized_weight", "target_schemes"]

BLOCK_SCALES = "bfloat16"
"""``base_quantization["block_scales"]`` of new 4-bit records: ``P`` and fingerprints were read with the block
scales rounded to this dtype (see the module docstring). Records without the key (pica 0.1) read them as stored."""


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
        return dequantize_4bit(packed, state, _scales_dtype(scheme))
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


def check_record(record: Any) -> None:
    """Raise ``ValueError`` naming the problem if ``record`` is not a valid ``PiCaConfig.base_quantization``."""
    if record is None:
        return
    if not isinstance(record, dict) or record.get("method") not in SCHEME_KEYS:
        raise ValueError(f"PiCaConfig.base_quantization must be None or a dict with 'method' in {sorted(SCHEME_KEYS)}, "
                         f"got {record!r}")
    expected = {"method", "unquantized_modules", *SCHEME_KEYS[record["method"]]}
    optional = {"block_scales"} if record["method"] == "bitsandbytes_4bit" else set()
    if not expected <= set(record) <= expected | optional:
        raise ValueError(f"PiCaConfig.base_quantization for {record['method']} needs exactly the keys {sorted(expected)}"
                         f"{f' (optionally {sorted(optional)})' if optional else ''}, got {sorted(record)}")
    if record.get("block_scales", BLOCK_SCALES) != BLOCK_SCALES:
        raise ValueError(f"PiCaConfig.base_quantization['block_scales'] must be {BLOCK_SCALES!r}, "
                         f"got {record['block_scales']!r}")
    modules = record["unquantized_modules"]
    if not isinstance(modules, list) or not all(isinstance(name, str) for name in modules):
        raise ValueError(f"PiCaConfig.base_quantization['unquantized_modules'] must be a list of str, got {modules!r}")


def quantization_distances(record: dict[str, Any], modules: dict[str, nn.Module]) -> dict[str, float]:
    """Module name → ``‖W − Q(W)‖_F / ‖W‖_F``: how far each full-precision weight is from itself quantised by
    ``record`` (computed one layer at a time)."""
    distances = {}
    for name, module in modules.items():
        weight = base_weight_out_in(module).detach().float()  # (out, in)
        quantized = requantized_weight(weight, record)
        distances[name] = float(torch.linalg.norm(weight - quantized) / torch.linalg.norm(weight).clamp_min(1e-30))
    return distances
