"""The PiCa tuner layer: wraps an ``nn.Linear`` or transformers ``Conv1D`` base layer.

Per adapter a layer holds the frozen projector ``P (rank×in)`` and the base-weight fingerprint as
buffers. The group's trainable ``M (out×rank)`` is registered on one member only, the group's
*leader*; the other members keep a plain (unregistered) reference to the leader layer and read
``leader.pica_M[adapter]`` at every use. So ``M`` appears once in ``parameters()``, in optimisers and
in ``state_dict()``, its gradient is the sum over the members, and any route that replaces the
parameter object (a loader assigning tensors, a dtype cast) keeps the group shared.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..functional import delta_weight, merged_pica_linear, pica_delta
from ..projector import fingerprint_distance
from .forms import FORWARD_MODES, use_merged_form

logger = logging.getLogger(__name__)

__all__ = ["FINGERPRINT_TOLERANCE", "FORWARD_MODES", "Linear", "PiCaLayer", "base_weight_out_in"]

FINGERPRINT_TOLERANCE = 2e-2
"""Largest accepted fingerprint distance (relative to ‖W0‖_F); bf16 rounding gives ~3e-3."""


def _is_sharded(tensor: torch.Tensor) -> bool:
    """True for a DTensor (FSDP2 keeps parameters of a unit that is not running as DTensor shards)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def base_weight_out_in(base_layer: nn.Module) -> torch.Tensor:
    """The base weight in PyTorch ``(out_features, in_features)`` layout (a view for ``Conv1D``)."""
    if isinstance(base_layer, Conv1D):
        return base_layer.weight.T  # Conv1D stores (in_features, out_features)
    if isinstance(base_layer, nn.Linear):
        return base_layer.weight
    raise TypeError(f"PiCa supports nn.Linear and transformers Conv1D, got {type(base_layer).__name__}")


class PiCaLayer(BaseTunerLayer):
    """State and merge logic shared by PiCa layer types."""

    adapter_layer_names = ("pica_M",)
    other_param_names = ("pica_P", "pica_fingerprint", "rank", "pica_group", "pica_leader")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.pica_M = nn.ParameterDict({})
        self.pica_P = BufferDict({}, persistent=True)
        self.pica_fingerprint = BufferDict({}, persistent=True)
        self.rank: dict[str, int] = {}
        self.pica_group: dict[str, str] = {}
        self.pica_leader: dict[str, PiCaLayer] = {}  # plain dict: the leader is not a submodule
        self._base_fingerprint: dict[str, torch.Tensor] = {}  # computed from this base at injection
        self._verified_fingerprint: dict[str, tuple[int, int]] = {}
        self._projector_pending: set[str] = set()  # P is a placeholder until the adapter file supplies it
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.pica_forward_mode: str = kwargs.pop("forward_mode", "auto")
        weight = base_weight_out_in(self.get_base_layer())
        self.out_features, self.in_features = weight.shape
        self.kwargs = kwargs

    def update_layer(
        self,
        adapter_name: str,
        update: nn.Parameter | PiCaLayer,
        projector: torch.Tensor,
        fingerprint: torch.Tensor,
        group: str,
        inference_mode: bool = False,
        projector_pending: bool = False,
    ) -> None:
        """Attach adapter ``adapter_name``.

        Args:
            adapter_name: adapter name.
            update: the group's trainable ``M``, ``(out_features, rank)``, if this layer leads its
                group; otherwise the leader layer, whose ``M`` this layer uses.
            projector: frozen ``P``, ``(rank, in_features)``.
            fingerprint: ``(FINGERPRINT_SIZE,)`` float64 fingerprint of the base weight.
            group: the group key (for saving one ``M`` per group).
            inference_mode: freeze the adapter.
            projector_pending: ``projector`` is a placeholder that a load must replace (see
                :meth:`projector_loaded`); until then the adapter refuses to run.
        """
        rank = projector.shape[0]
        if isinstance(update, PiCaLayer):
            self.pica_leader[adapter_name] = update
            update = update.pica_M[adapter_name]
        else:
            self.pica_M[adapter_name] = update
        if update.shape != (self.out_features, rank) or projector.shape[1] != self.in_features:
            raise ValueError(
                f"PiCa shapes do not fit a ({self.out_features}×{self.in_features}) layer: "
                f"M {tuple(update.shape)}, P {tuple(projector.shape)}"
            )
        self.rank[adapter_name] = rank
        self.pica_group[adapter_name] = group
        self.pica_P[adapter_name] = projector
        self.pica_fingerprint[adapter_name] = fingerprint
        self._base_fingerprint[adapter_name] = fingerprint.detach().clone()
        (self._projector_pending.add if projector_pending else self._projector_pending.discard)(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: Optional[torch.device] = None) -> None:
        """Move this adapter to the base layer's device, keeping dtypes and the shared ``M`` object."""
        target = device if device is not None else base_weight_out_in(self.get_base_layer()).device
        if target.type == "meta":
            return
        if adapter_name in self.pica_M and self.pica_M[adapter_name].device != target:
            update = self.pica_M[adapter_name]
            update.data = update.data.to(target)  # in place: every group member holds this object
        for buffers in (self.pica_P, self.pica_fingerprint):
            if adapter_name in buffers:
                buffers[adapter_name] = buffers[adapter_name].to(target)

    def get_update(self, adapter_name: str) -> nn.Parameter:
        """The group's ``M``, ``(out_features, rank)`` (held by the group's leader layer).

        Raises:
            RuntimeError: ``M`` is sharded away by FSDP because the leader is in another FSDP unit.
        """
        leader = self.pica_leader.get(adapter_name, self)
        update = leader.pica_M[adapter_name]
        if update.shape != (self.out_features, self.rank[adapter_name]) or _is_sharded(update):
            raise RuntimeError(
                f"PiCa adapter '{adapter_name}': the shared M of group '{self.pica_group[adapter_name]}' is not "
                f"materialised here (it has shape {tuple(update.shape)}, type {type(update).__name__}): FSDP has "
                "sharded it because the layers sharing it are in different FSDP units. Supported: wrap the whole "
                "PeftModel as one FSDP unit (no per-layer auto-wrap policy), or use "
                "PiCaConfig(share_across_layers=False) with per-layer wrapping, or DDP."
            )
        return update

    def projector_loaded(self, adapter_name: str) -> None:
        """Mark ``P`` of ``adapter_name`` as supplied by the adapter file (validated by the loader)."""
        self._projector_pending.discard(adapter_name)

    def fingerprint_distance(self, adapter_name: str, stored: torch.Tensor) -> float:
        """Distance between a stored fingerprint and the one computed from this layer's base weight."""
        return fingerprint_distance(stored, self._base_fingerprint[adapter_name])

    def check_fingerprint(self, adapter_name: str) -> None:
        """Compare the (possibly loaded) fingerprint with this base weight's; cached until it changes.

        Skipped while ``torch.compile`` traces (a Python-side cache keyed by tensor ids would make it
        recompile for every layer); loads through peft are checked at load time and any eager call
        checks again.

        Raises:
            ValueError: the adapter's fingerprint belongs to another base weight.
        """
        if torch.compiler.is_compiling():
            return
        if adapter_name in self._projector_pending:
            raise RuntimeError(f"PiCa adapter '{adapter_name}': the projector P of this layer was never loaded "
                               "(the adapter load did not complete)")
        stored = self.pica_fingerprint[adapter_name]
        state = (id(stored), -1 if stored.is_inference() else stored._version)  # inference tensors: no counter
        if self._verified_fingerprint.get(adapter_name) == state or stored.is_meta:
            return
        distance = self.fingerprint_distance(adapter_name, stored)
        if distance > FINGERPRINT_TOLERANCE:
            raise ValueError(
                f"PiCa adapter '{adapter_name}' was trained on a different base weight than this layer "
                f"(group {self.pica_group[adapter_name]}, fingerprint distance {distance:.3g})"
            )
        self._verified_fingerprint[adapter_name] = state

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``ΔW = M P`` in PyTorch layout ``(out_features, in_features)``, in ``M``'s dtype."""
        return delta_weight(self.pica_P[adapter_name], self.get_update(adapter_name))

    def _delta_in_storage_layout(self, adapter_name: str, dtype: torch.dtype) -> torch.Tensor:
        delta = self.get_delta_weight(adapter_name)  # (out, in)
        if isinstance(self.get_base_layer(), Conv1D):
            delta = delta.T  # (in, out) as Conv1D stores it
        return delta.to(dtype)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Add ``M P`` of the active (or given) adapters into the base weight.

        Args:
            safe_merge: compute the merged weight in a copy and raise if it is not finite.
            adapter_names: adapters to merge (default: the active ones).

        Raises:
            ValueError: with ``safe_merge``, naming the adapter whose merge gives non-finite weights.
        """
        adapter_names = check_adapters_to_merge(self, adapter_names)
        weight = self.get_base_layer().weight
        for name in adapter_names:
            if name not in self.pica_P:
                continue
            self.check_fingerprint(name)
            delta = self._delta_in_storage_layout(name, weight.dtype)
            if safe_merge:
                merged = weight.data + delta
                if not torch.isfinite(merged).all():
                    raise ValueError(f"NaNs or infs would appear when merging PiCa adapter '{name}'; not merged")
                weight.data = merged
            else:
                weight.data += delta
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

    def __init__(self, base_layer: nn.Module, adapter_name: str, **kwargs: Any) -> None:
        super().__init__()
        PiCaLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name

    def _use_merged_form(self, x: torch.Tensor, name: str, *args: Any, **kwargs: Any) -> bool:
        """Whether this call uses the merged form (see :func:`pica.tuner.forms.use_merged_form`)."""
        return use_merged_form(self.pica_forward_mode, x, self.get_base_layer(), self.get_update(name),
                               self.pica_P[name], extra_arguments=bool(args or kwargs))

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``base_layer(x) + (x Pᵀ) Mᵀ``, computed in the form chosen by ``pica_forward_mode``.

        ``"factored"``: ``base_layer(x)`` plus the factored term (any base layer, any dtype).
        ``"merged"``: ``x (W0 + M P)ᵀ + b`` in one product, saving only ``x Pᵀ`` for backward and
        rebuilding ``W0 + M P`` there. ``"merged_keep"``: the same, keeping ``W0 + M P`` for backward
        (one ``out×in`` tensor of activation memory per layer, faster). ``"auto"`` (default): the form
        with fewer FLOPs for this call's shapes (small token counts favour factored). Merged forms
        apply only when exact (see ``_use_merged_form``); otherwise the factored form runs.

        Args: x ``(..., in_features)``. Returns ``(..., out_features)`` in the base output dtype.
        """
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        active = [name for name in self.active_adapters if name in self.pica_P]
        if len(active) == 1 and self._use_merged_form(x, active[0], *args, **kwargs):
            name = active[0]
            self.check_fingerprint(name)
            base = self.get_base_layer()
            return merged_pica_linear(x, base.weight, base.bias, self.pica_P[name], self.get_update(name),
                                      in_out=isinstance(base, Conv1D), keep_merged=self.pica_forward_mode == "merged_keep")
        result = self.base_layer(x, *args, **kwargs)
        for name in self.active_adapters:
            if name not in self.pica_P:
                continue
            self.check_fingerprint(name)
            result = result + pica_delta(x, self.pica_P[name], self.get_update(name)).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "pica." + super().__repr__()
