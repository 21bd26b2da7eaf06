"""Plan an adapter before touching the model: targets, groups, projectors, shared ``M``. Every check runs here,
before peft replaces a single module, so a bad config or model leaves the model exactly as it was."""

from __future__ import annotations

import functools
import itertools
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, _ExcludedModule
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..base_weights import base_shape, check_supported, is_quantized
from ..fingerprint import FINGERPRINT_SIZE, weight_fingerprint
from ..grouping import roles as group_roles
from ..grouping import update_key, validate_groups
from ..projector_batch import LazyWeight
from ..projector_sharing import compute_projectors
from ..quantization_record import adapter_view, quantization_distances, quantization_record, target_schemes
from ..random_subspace import random_orthonormal_rows
from .config import PiCaConfig
from .layer import PiCaLayer

logger = logging.getLogger(__name__)

__all__ = ["AdapterPlan", "LayerPlan", "plan_adapter"]


@dataclass
class LayerPlan:
    """What one targeted layer receives.

    Attributes:
        group_key: key of the group's ``M`` (:func:`pica.grouping.update_key` of the role, or of the module).
        projector: ``(rank, in_features)`` frozen ``P``.
        fingerprint: ``(FINGERPRINT_SIZE,)`` float64 fingerprint of the base weight.
        scheme: the quantisation record ``P`` and the fingerprint read the weight by
            (:func:`pica.quantization_record.target_schemes`), or None.
        origin: how ``P`` is made (subspace, seed, projector dtype, scheme): an adapter of the same origin on the
            same weight takes the ``P`` a layer already holds.
    """

    group_key: str
    projector: torch.Tensor
    fingerprint: torch.Tensor
    scheme: dict | None = None
    origin: tuple = ()


@dataclass
class AdapterPlan:
    """Per-module plans, the zero-initialised trainable ``M`` of each group, ``(out_features, rank)``, and the
    quantisation record of the base (``PiCaConfig.base_quantization``; None for an unquantised one)."""

    layers: dict[str, LayerPlan]
    updates: dict[str, nn.Parameter]
    quantization: dict | None = None


def _find_targets(model: nn.Module, is_target: Callable[[str], object]) -> dict[str, nn.Module]:
    """Module name → base layer of every module the config targets (skipping adapter internals)."""
    targets: dict[str, nn.Module] = {}
    inside: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(prefix) for prefix in inside):
            continue
        if isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper)):
            inside.append(name + ".")
        match = is_target(name)
        if not match or isinstance(match, _ExcludedModule):
            continue
        targets[name] = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
    return targets


def _log_progress(count: int, total: int, name: str, shape: tuple[int, int]) -> None:
    """The ``PiCa projector i/n`` debug record (progress bars listen to it)."""
    logger.debug("PiCa projector %d/%d: %s %s", count, total, name, shape)


def plan_adapter(model: nn.Module, config: PiCaConfig, is_target: Callable[[str], object],
                 projectors: Mapping[str, torch.Tensor] | None = None) -> AdapterPlan:
    """Find, validate and prepare every target of one adapter; ``model`` is not changed.

    Args:
        model: the model to adapt.
        config: the adapter's prepared config (``target_modules`` filled in).
        is_target: peft's matcher for it (name → truthy / ``_ExcludedModule``).
        projectors: module name → ``(rank, in_features)`` ``P`` from the adapter file being loaded; every
            target must have one. None: compute (or take from another adapter) every ``P``.

    Raises:
        ValueError: no matches (listing candidates), rank too large, mixed ``out_features`` in a group,
            non-finite weights, a given ``P`` missing or mis-shaped (naming modules).
        TypeError: a target of an unsupported layer type (naming it).
    """
    rank, subspace, subspace_seed = config.rank, config.subspace, config.subspace_seed
    projector_dtype = getattr(torch, config.projector_dtype)
    targets = _find_targets(model, is_target)
    if not targets:
        names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))}
        raise ValueError(f"PiCa target_modules {config.target_modules!r} matched no module of {type(model).__name__}; "
                         f"linear layer names in this model include {sorted(names)[:12]}")
    check_supported(targets)
    unsupported = [f"{n} ({type(m).__name__})" for n, m in targets.items() if not isinstance(m, (nn.Linear, Conv1D))]
    if unsupported:
        raise TypeError(f"PiCa supports nn.Linear and transformers Conv1D only; targeted: {unsupported[:8]}")
    unused = [n for n in targets if "." in n and isinstance(model.get_submodule(n.rsplit(".", 1)[0]), nn.MultiheadAttention)]
    if unused:  # MultiheadAttention reads out_proj.weight itself and never calls out_proj: an adapter there does nothing
        raise TypeError(f"PiCa cannot adapt {unused[:8]}: nn.MultiheadAttention uses these weights without calling "
                        "the layer, so the adapter would never change the output")
    shapes = {name: base_shape(module) for name, module in targets.items()}  # (out, in), never packed storage
    too_small = [f"{n} {shape}" for n, shape in shapes.items() if rank > min(shape)]
    if too_small:
        raise ValueError(f"PiCaConfig.rank={rank} exceeds min(out_features, in_features) of {too_small[:8]}")
    roles = group_roles(list(targets), lambda path: type(model.get_submodule(path)).__name__,
                        lambda path: [type(child).__name__ for key, child in model.get_submodule(path).named_children()
                                      if key.isdecimal()], config.share_across_layers)
    members = validate_groups(roles, {name: shape[0] for name, shape in shapes.items()})
    groups = {name: update_key(role) for name, role in roles.items()}
    record = config.base_quantization if config.base_quantization is not None else quantization_record(targets)
    schemes = target_schemes(record, targets)  # how to read each target trained quantised (see quantized.adapter_view)
    origins = {name: (subspace, subspace_seed if subspace == "random" else None, str(projector_dtype),
                      json.dumps(schemes.get(name), sort_keys=True)) for name in targets}

    def read(name: str) -> torch.Tensor:  # (out, in); a new tensor for quantised (or re-quantised) weights
        return adapter_view(targets[name], schemes.get(name))

    real = [name for name, module in targets.items() if not module.weight.is_meta]
    # one weight at a time (never every de-quantised weight at once); a float64 norm is finite iff every entry is
    fingerprints = {name: weight_fingerprint(read(name)) for name in real}
    if bad := [name for name, fingerprint in fingerprints.items() if not torch.isfinite(fingerprint[0])]:
        raise ValueError(f"PiCa target(s) {bad[:8]} have non-finite base weights")
    requantized = {name: targets[name] for name in schemes if name in fingerprints and not is_quantized(targets[name])}
    if requantized:
        distances = quantization_distances(record, requantized)
        worst = max(distances, key=distances.get)
        logger.warning("PiCa adapter trained on a quantised base (%s) is used on full-precision weights at %d module(s): "
                       "its P and fingerprints are taken from these weights quantised again by that scheme, but the "
                       "outputs are those of the full-precision base, which differs from the trained-on one by "
                       "quantisation: relative weight distance %.3g (mean) up to %.3g (%s).",
                       {k: v for k, v in record.items() if k != "unquantized_modules"}, len(distances),
                       sum(distances.values()) / len(distances), distances[worst], worst)
    devices = {name: targets[name].weight.device for name in real}
    if projectors is not None:
        unfit = [f"{name}: P missing" if name not in projectors else f"{name}: P has shape "
                 f"{tuple(projectors[name].shape)}, expected {(rank, shapes[name][1])}"
                 for name in shapes if getattr(projectors.get(name), "shape", None) != (rank, shapes[name][1])]
        if unfit:
            raise ValueError(f"the adapter file does not fit this model at {len(unfit)} module(s): {'; '.join(unfit[:6])}")
        projectors = {name: projectors[name].to(devices[name], torch.float32) for name in real}
    elif subspace == "random":
        projectors = {}
        for index, name in enumerate(real):
            random_rows = random_orthonormal_rows(name, rank, shapes[name][1], subspace_seed)  # (rank, in)
            projectors[name] = random_rows.to(devices[name])
            _log_progress(index + 1, len(real), name, shapes[name])
    else:  # a P another adapter holds, made the same way from this weight, is taken as it is
        held = {name: projector for name in real if isinstance(layer := model.get_submodule(name), PiCaLayer)
                and (projector := layer.held_projector(origins[name], rank, fingerprints[name])) is not None}
        todo = [name for name in real if name not in held]
        finished = itertools.count(1)  # next() is atomic under the GIL: a thread-safe counter

        def done(index: int) -> None:
            _log_progress(next(finished), len(todo), todo[index], shapes[todo[index]])

        sources = [LazyWeight(shapes[name], devices[name], functools.partial(read, name))
                   if is_quantized(targets[name]) or name in schemes else read(name) for name in todo]
        # every rank calls (a collective when a process group is up): shares the work if all hold the same weights
        computed = compute_projectors(sources, rank, projector_dtype, [fingerprints[name] for name in todo], done=done)
        projectors = {**held, **{name: projector.float() for name, projector in zip(todo, computed)}}  # (rank, in)
        if held:
            logger.info("PiCa: %d of %d projectors taken from another adapter's (same weight and settings)",
                        len(held), len(real))
    layers = {}
    for name, shape in shapes.items():  # a weightless (meta) base gets meta P (rank, in) and fingerprint
        projector = projectors[name] if name in fingerprints else torch.empty(rank, shape[1], device="meta")
        fingerprint = fingerprints.get(name, torch.empty(FINGERPRINT_SIZE, dtype=torch.float64, device="meta"))
        layers[name] = LayerPlan(groups[name], projector, fingerprint, schemes.get(name), origins[name])
    updates = {update_key(role): nn.Parameter(torch.zeros(shapes[names[0]][0], rank,  # (out, rank) fp32, zero
                                                          device=targets[names[0]].weight.device))
               for role, names in members.items()}
    logger.info("PiCa: %d layers in %d groups, rank %d", len(layers), len(updates), rank)
    return AdapterPlan(layers, updates, record)
