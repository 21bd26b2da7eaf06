"""The PiCa tuner layer around an ``nn.Linear`` or transformers ``Conv1D``: per adapter the frozen ``P (rank×in)``
and a fingerprint of the base weight (buffers). The group's trainable ``M (out×rank)`` lives on the tuner
(:class:`pica.tuner.model.PiCaModel`) and is looked up at each use: one tensor in ``parameters()``, optimisers and
``state_dict()``, its gradient summed over the group, and in the root FSDP unit that every per-layer unit sees.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Optional

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

try:  # FSDP2 keeps the parameters of a unit that is not running as DTensor shards
    from torch.distributed.tensor import DTensor as _Sharded
except ImportError:  # torch built without distributed support
    _Sharded = ()

from ..base_weights import base_shape, base_weight_out_in, is_quantized
from ..fingerprint import FINGERPRINT_TOLERANCE, fingerprint_distance, weight_fingerprint
from ..functional import add_mixed_pica_terms, cheaper_form, delta_weight, merged_pica_linear, pica_delta
from ..quantization_record import adapter_view
from ..sharded_state import broadcast_by_fsdp1, full_weight, local_entries, replicate_entries
from ..shared_storage import apply_keeping_shares, share, take_for_load

logger = logging.getLogger(__name__)

__all__ = ["Linear", "PiCaLayer", "base_weight_out_in", "check_merge", "fingerprint_mismatches", "merged_adapter_names",
           "merged_form_applies", "pica_layers"]


def pica_layers(model: nn.Module, adapter_name: Optional[str] = None) -> Iterator[tuple[str, PiCaLayer]]:
    """``(module name, layer)`` of every PiCa layer in ``model`` (holding ``adapter_name``, if given)."""
    for name, module in model.named_modules():
        if isinstance(module, PiCaLayer) and (adapter_name is None or adapter_name in module.pica_P):
            yield name, module


def merged_adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters merged into any PiCa layer's base weight in ``model`` (sorted)."""
    return sorted({name for _, layer in pica_layers(model) for name in layer.merged_adapters})


def fingerprint_mismatches(stored: list[tuple[str, "PiCaLayer", str, torch.Tensor]]) -> str | None:
    """The fingerprint check of every load route: the refusal naming the modules whose stored fingerprint belongs
    to another base weight (hinting when a base is quantised), or None. ``stored``: ``(module name, layer, adapter
    name, stored (FINGERPRINT_SIZE,) fingerprint)`` per layer."""
    mismatched, quantized = [], False
    for name, layer, adapter_name, fingerprint in stored:
        if not layer.pica_fingerprint[adapter_name].is_meta and not fingerprint.is_meta:
            distance = fingerprint_distance(fingerprint, layer._base_fingerprint[adapter_name])
            if distance > FINGERPRINT_TOLERANCE:
                mismatched.append(f"{name} (distance {distance:.3g})")
                quantized = quantized or is_quantized(layer.get_base_layer())
    if not mismatched:
        return None
    hint = (" (this base is quantised: if the adapter was trained on full-precision weights, PiCa cannot reproduce "
            "them from the quantised ones; load it onto the full-precision base, or train on the quantised one)"
            if quantized else "")
    return (f"the adapter was trained on a different base model{hint}: a different base weight at {len(mismatched)} "
            f"module(s): {', '.join(mismatched[:6])}")


def _note_loaded_keys(module: PiCaLayer, state_dict: dict, prefix: str, *args: Any) -> None:
    """``load_state_dict`` pre-hook: note the layer's name and the keys loaded; DTensor P and fingerprints (FSDP2
    loaders) become plain tensors; shared projectors stay right (:func:`pica.shared_storage.take_for_load`)."""
    local_entries(state_dict, prefix + "pica_")
    module._pica_loading = (prefix.rstrip("."), {key.removeprefix(prefix) for key in state_dict if key.startswith(prefix)})
    for adapter in list(module.pica_P):  # a shared P is written in place: never change the other adapters'
        if (key := f"{prefix}pica_P.{adapter}") in state_dict:
            state_dict[key] = take_for_load(module.pica_P, adapter, state_dict[key])


def _check_loaded_fingerprints(module: PiCaLayer, incompatible_keys: Any) -> None:
    """``load_state_dict`` post-hook: raise ``ValueError`` if a fingerprint loaded by any route belongs to another
    base weight (:func:`fingerprint_mismatches`; loads through peft meet it before anything is loaded)."""
    name, loaded = module.__dict__.pop("_pica_loading", ("", set()))
    module.pica_unset -= {adapter for adapter in module.pica_unset
                          if f"pica_P.{adapter}" in loaded and f"pica_fingerprint.{adapter}" in loaded}
    if any(key.startswith("base_layer.") for key in loaded):
        module.refresh_base_fingerprint()
    adapters = [a for a in module.pica_fingerprint if a not in module.pica_unset  # never computed: nothing to compare
                and (f"pica_fingerprint.{a}" in loaded or "base_layer.weight" in loaded)]
    if mismatch := fingerprint_mismatches([(name, module, a, module.pica_fingerprint[a]) for a in adapters]):
        raise ValueError(f"PiCa adapter(s) {adapters}: {mismatch}")


def _replicated_beside_shards(module: PiCaLayer, state_dict: dict, prefix: str, *args: Any) -> None:
    """``state_dict`` post-hook: beside an FSDP2-sharded base weight, P and fingerprints are replicated DTensors,
    as accelerate's ``fsdp2_load_full_state_dict`` expects of every entry (:mod:`pica.sharded_state`)."""
    replicate_entries(state_dict, prefix + "pica_", module.get_base_layer().weight)


def check_merge(layers: dict[str, "PiCaLayer"], adapter_names: Optional[list[str]], safe_merge: bool) -> None:
    """Refuse a merge of ``adapter_names`` (None: each layer's active ones) into ``layers`` (name → layer) before
    any weight changes. Raises ``TypeError`` for a quantised base (re-quantising ``W0 + M P`` would change the
    outputs by the rounding, and unmerging could not restore ``W0``); with ``safe_merge``, ``ValueError`` (peft's
    wording) naming the adapters whose merge alone is non-finite (all, if only their sum is) and the modules."""
    quantized = [f"{name or 'layer'} ({type(layer.get_base_layer()).__name__})" for name, layer in layers.items()
                 if is_quantized(layer.get_base_layer())]
    if quantized:
        raise TypeError(
            f"PiCa does not merge into quantised base layers {quantized[:4]}: re-quantising W0 + M P would change the "
            "outputs by the rounding error. Instead: keep the adapter unmerged (the forward is exact), write a "
            "full-precision merged checkpoint with pica.export_merged(model, out_dir), or load the adapter onto the "
            "full-precision base and merge there.")
    bad, broken = [], []
    for name, layer in layers.items() if safe_merge else ():
        weight = layer.get_base_layer().weight
        deltas = {a: layer._delta_in_storage_layout(a, weight.dtype)
                  for a in (layer.active_adapters if adapter_names is None else adapter_names)
                  if a in layer.pica_P and a not in layer.merged_adapters}
        if deltas and not torch.isfinite(weight + sum(deltas.values())).all():
            bad.append(name or "layer")
            alone = [a for a, delta in deltas.items() if not torch.isfinite(weight + delta).all()] or list(deltas)
            broken += [a for a in alone if a not in broken]
    if bad:  # peft's wording first (callers match on it), then which modules
        raise ValueError(f"NaNs detected in the merged weights. The adapter {', '.join(broken)} seems to be broken: "
                         f"NaNs or infs would appear when merging PiCa adapter(s) into {bad[:6]}; nothing merged")


def merged_form_applies(x: torch.Tensor, base: nn.Module, update: torch.Tensor, projector: torch.Tensor) -> bool:
    """Whether ``forward_mode="auto"`` computes this call as ``x (W0 + M P)ᵀ + b`` in one product: only on a plain
    ``nn.Linear``/``Conv1D`` (no hooks, no instance ``forward``), everything in one dtype and device (exact), no
    autocast, ``torch.func`` or forward-mode AD, and fewer FLOPs (:func:`pica.functional.cheaper_form`).

    Args: x ``(..., in)``; base the base layer; update ``M (out, rank)``; projector ``P (rank, in)``.
    """
    weight = base.weight
    hooks = (base._forward_hooks, base._forward_pre_hooks, nn.modules.module._global_forward_hooks,
             nn.modules.module._global_forward_pre_hooks)
    if (type(base) not in (nn.Linear, Conv1D) or type(weight) not in (nn.Parameter, torch.Tensor) or any(hooks)
            or "forward" in vars(base) or torch.is_autocast_enabled(x.device.type)
            or torch._C._are_functorch_transforms_active() or torch.autograd.forward_ad._current_level >= 0):
        return False
    if not (x.dtype == weight.dtype == update.dtype == projector.dtype
            and x.device == weight.device == update.device == projector.device):
        return False
    grad = torch.is_grad_enabled()
    return cheaper_form(x.numel() // max(projector.shape[1], 1), projector.shape[1], update.shape[0], projector.shape[0],
                        input_grad=grad and x.requires_grad, update_grad=grad and update.requires_grad) == "merged"


class _DtypeKeepingBuffers(BufferDict):
    """A ``BufferDict`` whose tensors follow device moves but keep their dtypes: ``P`` (float32) and fingerprints
    (float64) describe the base weight, and ``model.to(torch.bfloat16)`` must not round them (a bf16 ``P`` is not
    orthonormal to 1e-4). Adapters sharing one ``P`` storage (:mod:`pica.shared_storage`) still share it after."""

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> "_DtypeKeepingBuffers":
        def keep_dtype(tensor: torch.Tensor) -> torch.Tensor:
            moved = fn(tensor)
            return moved if moved.dtype == tensor.dtype else tensor.to(device=moved.device)

        tensors = [tensor for tensor in self._buffers.values() if tensor is not None]
        return super()._apply(apply_keeping_shares(tensors, keep_dtype), recurse)


class PiCaLayer(BaseTunerLayer):
    """Per-layer state, the lookup of the group's ``M``, merges."""

    adapter_layer_names = ()  # the trainable M lives on the tuner, not on layers
    other_param_names = ("pica_P", "pica_fingerprint", "rank", "pica_group", "pica_scheme", "pica_origin")

    def __init__(self, base_layer: nn.Module, updates: nn.ModuleDict, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.__dict__["_pica_updates"] = updates  # the tuner's M store; a plain reference, not a submodule
        self.pica_P = _DtypeKeepingBuffers({}, persistent=True)  # float32 whatever the model's dtype
        self.pica_fingerprint = _DtypeKeepingBuffers({}, persistent=True)  # float64
        self.rank: dict[str, int] = {}
        self.pica_group: dict[str, str] = {}  # adapter → key of its group's M (see grouping.update_key)
        self.pica_scheme: dict[str, Optional[dict]] = {}  # adapter → its base_quantization record (quantized.adapter_view)
        self.pica_origin: dict[str, tuple] = {}  # adapter → how its P was made (subspace, seed, dtype, scheme)
        self._base_fingerprint: dict[str, torch.Tensor] = {}  # of this base weight, computed at injection
        self.pica_unset: set[str] = set()  # adapters made on a meta-device base: P never computed nor loaded
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.pica_forward_mode = "auto"  # the adapter config's, set at each injection
        self.out_features, self.in_features = base_shape(self.get_base_layer())
        self.kwargs = kwargs
        self.register_load_state_dict_pre_hook(_note_loaded_keys)
        self.register_load_state_dict_post_hook(_check_loaded_fingerprints)
        self.register_state_dict_post_hook(_replicated_beside_shards)

    def update_layer(self, adapter_name: str, group_key: str, projector: torch.Tensor, fingerprint: torch.Tensor,
                     inference_mode: bool = False, scheme: Optional[dict] = None, origin: tuple = ()) -> None:
        """Attach adapter ``adapter_name`` (see :class:`pica.tuner.plan.LayerPlan` for the arguments): ``P``
        ``(rank, in_features)``, stored once if it agrees with another adapter's (:func:`pica.shared_storage.share`),
        and the ``(FINGERPRINT_SIZE,)`` float64 fingerprint. Raises ``ValueError`` if ``M`` or ``P`` does not fit."""
        rank = projector.shape[0]
        update = self._pica_updates[adapter_name][group_key]
        if update.shape != (self.out_features, rank) or projector.shape[1] != self.in_features:
            raise ValueError(f"PiCa shapes do not fit a ({self.out_features}×{self.in_features}) layer: "
                             f"M {tuple(update.shape)}, P {tuple(projector.shape)}")
        self.rank[adapter_name] = rank
        self.pica_group[adapter_name] = group_key
        self.pica_scheme[adapter_name] = scheme
        self.pica_origin[adapter_name] = origin
        self.pica_P[adapter_name] = share(self.pica_P, projector.to(torch.float32))
        (self.pica_unset.add if projector.is_meta else self.pica_unset.discard)(adapter_name)
        self.pica_fingerprint[adapter_name] = fingerprint
        self._base_fingerprint[adapter_name] = fingerprint.detach().clone()
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: Optional[torch.device] = None) -> None:
        """Move ``P`` and the fingerprint to the base layer's device, keeping their dtypes."""
        target = device if device is not None else self.get_base_layer().weight.device
        if target.type != "meta":  # every adapter's: a layer's P live with its base (and shares stay whole)
            self.pica_P._apply(lambda tensor: tensor.to(target))
            self.pica_fingerprint._apply(lambda tensor: tensor.to(target))

    def held_projector(self, origin: tuple, rank: int, fingerprint: torch.Tensor) -> Optional[torch.Tensor]:
        """The leading ``rank`` rows of a ``P`` this layer holds for another adapter, made the same way
        (``origin``: subspace, seed, projector dtype, quantisation scheme) from this very base weight (its
        fingerprint at that adapter's injection equals ``fingerprint``), with at least ``rank`` rows; or None."""
        for name, projector in self.pica_P.items():
            if (origin and self.pica_origin.get(name) == origin and name not in self.pica_unset
                    and projector.shape[0] >= rank and torch.equal(self._base_fingerprint[name], fingerprint)):
                return projector[:rank]
        return None

    def check_projector(self, adapter_name: str) -> None:
        """Raise ``RuntimeError`` if ``P`` was never computed (a meta-device base) nor filled since (a load, or
        FSDP1's rank-0 broadcast of rank 0's base weight and fingerprint)."""
        if adapter_name in self.pica_unset and broadcast_by_fsdp1(self.pica_P[adapter_name],
                                                                  self.pica_fingerprint[adapter_name]):
            self.pica_unset.discard(adapter_name)
            self._base_fingerprint[adapter_name] = self.pica_fingerprint[adapter_name].detach().clone()
        if adapter_name in self.pica_unset:
            raise RuntimeError(
                f"PiCa adapter '{adapter_name}': P of this ({self.out_features}×{self.in_features}) layer of group "
                f"'{self.pica_group[adapter_name]}' was never computed: the adapter was created on a base whose "
                "weights were on the meta device. Load the adapter's tensors into it (PeftModel.from_pretrained, "
                "set_peft_model_state_dict, or rank 0's state dict with torch's set_model_state_dict(..., "
                "broadcast_from_rank0=True)), or create it with get_peft_model on the real weights.")

    def get_update(self, adapter_name: str) -> nn.Parameter:
        """The group's ``M``, ``(out_features, rank)``, from the tuner's store. Raises ``RuntimeError`` if ``M`` is
        still an FSDP shard here (the tuner is not in a running unit) or ``P`` was never computed."""
        self.check_projector(adapter_name)
        update = self._pica_updates[adapter_name][self.pica_group[adapter_name]]
        if isinstance(update, _Sharded):
            raise RuntimeError(
                f"PiCa adapter '{adapter_name}': M of group '{self.pica_group[adapter_name]}' is still an FSDP shard "
                "here. The shared M lives on the PeftModel's tuner: shard the root module too (fully_shard(model) "
                "after the layers, or an FSDP1 wrap of the whole PeftModel around the per-layer units)."
            )
        return update

    def refresh_base_fingerprint(self) -> None:
        """Recompute the base weight's fingerprint as each adapter reads it (after its values were loaded)."""
        base = self.get_base_layer()
        if not base.weight.is_meta:
            for name in self._base_fingerprint:
                view = full_weight(adapter_view(base, self.pica_scheme.get(name)))  # FSDP2 shard: gathered
                self._base_fingerprint[name] = weight_fingerprint(view)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``ΔW = M P`` in PyTorch layout ``(out_features, in_features)``, in ``M``'s dtype."""
        return delta_weight(self.pica_P[adapter_name], self.get_update(adapter_name))

    def _delta_in_storage_layout(self, adapter_name: str, dtype: torch.dtype) -> torch.Tensor:
        delta = self.get_delta_weight(adapter_name)  # (out, in)
        if isinstance(self.get_base_layer(), Conv1D):
            delta = delta.T  # (in, out) as Conv1D stores it
        return delta.to(dtype)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Add ``M P`` of the active (or given) adapters into the base weight; refused as :func:`check_merge` says."""
        adapter_names = [name for name in check_adapters_to_merge(self, adapter_names) if name in self.pica_P]
        check_merge({"": self}, adapter_names, safe_merge)
        weight = self.get_base_layer().weight
        for name in adapter_names:
            weight.data += self._delta_in_storage_layout(name, weight.dtype)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Subtract the merged adapters from the base weight, last merged first."""
        if not self.merged:
            logger.warning("Already unmerged; nothing to do.")
            return
        weight = self.get_base_layer().weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.pica_P:
                weight.data -= self._delta_in_storage_layout(name, weight.dtype)


class Linear(nn.Module, PiCaLayer):
    """PiCa around ``nn.Linear`` or ``Conv1D``: ``y = base_layer(x) + (x Pᵀ) Mᵀ``."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, updates: nn.ModuleDict, **kwargs: Any) -> None:
        super().__init__()
        PiCaLayer.__init__(self, base_layer, updates, **kwargs)
        self._active_adapter = adapter_name

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``base_layer(x) + (x Pᵀ) Mᵀ``, or ``x (W0 + M P)ᵀ + b`` where :func:`merged_form_applies`.
        Args: x ``(..., in_features)``. Returns ``(..., out_features)`` in the base output dtype."""
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, adapter_names, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        active = [name for name in self.active_adapters if name in self.pica_P]
        base = self.get_base_layer()
        if (len(active) == 1 and self.pica_forward_mode == "auto" and not (args or kwargs)
                and merged_form_applies(x, base, self.get_update(active[0]), self.pica_P[active[0]])):
            return merged_pica_linear(x, base.weight, base.bias, self.pica_P[active[0]], self.get_update(active[0]),
                                      in_out=isinstance(base, Conv1D))
        result = self.base_layer(x, *args, **kwargs)
        for name in active:
            result = result + pica_delta(x, self.pica_P[name], self.get_update(name)).to(result.dtype)
        return result

    def _mixed_batch_forward(self, x: torch.Tensor, adapter_names: Sequence[str], *args: Any, **kwargs: Any
                             ) -> torch.Tensor:
        """Row ``i`` of x ``(batch, ..., in_features)`` gets ``base_layer(x_i)`` plus the PiCa term of
        ``adapter_names[i]`` (none for ``"__base__"`` or an adapter not held here); adapters whose ``P`` share a
        storage are projected once. Raises ``ValueError``: not one name per row, or an adapter is merged."""
        if len(adapter_names) != x.shape[0]:
            raise ValueError("Length of `adapter_names` should be the same as the number of inputs, but got "
                             f"{len(adapter_names)} and {x.shape[0]} respectively. (peft's wording: one name per row)")
        if self.merged:
            raise ValueError("Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` "
                             "first.")
        result = self.base_layer(x, *args, **kwargs)
        add_mixed_pica_terms(result, x, adapter_names, {name: (self.pica_P[name], self.get_update(name))
                                                        for name in set(adapter_names) if name in self.pica_P})
        return result

    def __repr__(self) -> str:
        return "pica." + super().__repr__()
