"""The PiCa tuner layer: wraps an ``nn.Linear`` or transformers ``Conv1D`` base layer.

Per adapter a layer holds the frozen projector ``P (rank×in)`` and fingerprint as buffers and a
*reference* to its group's trainable ``M (out×rank)``: all members of a group hold the very same
``nn.Parameter`` object, so ``parameters()`` and optimisers see it once and its gradient is the sum
of the members' gradients.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..functional import delta_weight, pica_delta

logger = logging.getLogger(__name__)

__all__ = ["Linear", "PiCaLayer", "base_weight_out_in"]


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
    other_param_names = ("pica_P", "pica_fingerprint", "rank", "pica_group")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.pica_M = nn.ParameterDict({})
        self.pica_P = BufferDict({}, persistent=True)
        self.pica_fingerprint = BufferDict({}, persistent=True)
        self.rank: dict[str, int] = {}
        self.pica_group: dict[str, str] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        weight = base_weight_out_in(self.get_base_layer())
        self.out_features, self.in_features = weight.shape
        self.kwargs = kwargs

    def update_layer(
        self,
        adapter_name: str,
        update: nn.Parameter,
        projector: torch.Tensor,
        fingerprint: torch.Tensor,
        group: str,
        inference_mode: bool = False,
    ) -> None:
        """Attach adapter ``adapter_name``.

        Args:
            adapter_name: adapter name.
            update: the group's shared trainable ``M``, ``(out_features, rank)``.
            projector: frozen ``P``, ``(rank, in_features)``.
            fingerprint: ``(FINGERPRINT_SIZE,)`` float64 fingerprint of the base weight.
            group: the group key (for saving one ``M`` per group).
            inference_mode: freeze the adapter.
        """
        rank = projector.shape[0]
        if update.shape != (self.out_features, rank) or projector.shape[1] != self.in_features:
            raise ValueError(
                f"PiCa shapes do not fit a ({self.out_features}×{self.in_features}) layer: "
                f"M {tuple(update.shape)}, P {tuple(projector.shape)}"
            )
        self.rank[adapter_name] = rank
        self.pica_group[adapter_name] = group
        self.pica_M[adapter_name] = update
        self.pica_P[adapter_name] = projector
        self.pica_fingerprint[adapter_name] = fingerprint
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

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``ΔW = M P`` in PyTorch layout ``(out_features, in_features)``, in ``M``'s dtype."""
        return delta_weight(self.pica_P[adapter_name], self.pica_M[adapter_name])

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
            if name not in self.pica_M:
                continue
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
            if name in self.pica_M:
                weight.data -= self._delta_in_storage_layout(name, weight.dtype)


class Linear(nn.Module, PiCaLayer):
    """PiCa around ``nn.Linear`` or ``Conv1D``: ``y = base_layer(x) + (x Pᵀ) Mᵀ``."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, **kwargs: Any) -> None:
        super().__init__()
        PiCaLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Args: x ``(..., in_features)``. Returns ``(..., out_features)`` in the base output dtype."""
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        for name in self.active_adapters:
            if name not in self.pica_M:
                continue
            result = result + pica_delta(x, self.pica_P[name], self.pica_M[name]).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "pica." + super().__repr__()
