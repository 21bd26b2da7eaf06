"""One storage for the projectors that several adapters of one layer have in common.

``P`` depends only on the base weight, the rank and the subspace, so every adapter trained on one
base with the same settings holds the same ``P`` in a layer, and the leading ``r₁`` rows of a
rank-``r₂`` ``P`` span the rank-``r₁`` subspace. A layer's projectors are kept in a dict, adapter name
→ ``(rank, in_features)`` tensor; adapters whose projectors agree share one tensor: each holds a view
of the leading rows of the widest (its *root*), so ``n`` adapters cost one ``P``. Sharing is decided by
the values alone (:data:`SHARE_TOLERANCE`), never by names, so an adapter never computes with a ``P``
that differs from its own by more than that. Deleting an adapter drops its view; the root is freed
when no adapter uses it (reference counting). No ``peft`` import.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping

import torch

__all__ = ["SHARE_TOLERANCE", "apply_keeping_shares", "roots", "share", "shares_storage", "take_for_load"]

SHARE_TOLERANCE = 1e-6
"""Largest ``|ΔP|`` entry for two projectors to share one storage: float32 rounding of one subspace (the
leading rows of a rank-512 ``P`` and a rank-256 one computed alone differ by ~1e-7). An adapter whose ``P``
differs by more keeps its own copy."""


def shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two (non-meta) tensors are views of one storage."""
    return not (a.is_meta or b.is_meta) and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and (torch.equal(a, b) or float((a - b).abs().max()) <= SHARE_TOLERANCE)


def roots(projectors: MutableMapping[str, torch.Tensor]) -> list[torch.Tensor]:
    """The widest tensor of each storage among ``projectors`` (meta tensors left out)."""
    widest: dict[int, torch.Tensor] = {}
    for tensor in projectors.values():
        if not tensor.is_meta:
            key = tensor.untyped_storage().data_ptr()
            if key not in widest or tensor.shape[0] > widest[key].shape[0]:
                widest[key] = tensor
    return list(widest.values())


def share(projectors: MutableMapping[str, torch.Tensor], projector: torch.Tensor) -> torch.Tensor:
    """What a new adapter should hold for ``projector`` ``(rank, in)``: the leading rows of a held root that
    agrees with it, or ``projector`` itself. A wider ``projector`` that agrees with a held root becomes the
    root of that root's adapters (they then hold its leading rows, equal to theirs within the tolerance)."""
    if projector.is_meta:
        return projector
    rows = projector.shape[0]
    for root in roots(projectors):
        width = min(rows, root.shape[0])
        if root.device != projector.device or root.dtype != projector.dtype or root.shape[1] != projector.shape[1] \
                or not _close(root[:width], projector[:width]):
            continue
        if root.shape[0] >= rows:
            return root[:rows]
        for name, held in list(projectors.items()):
            if shares_storage(held, root):
                projectors[name] = projector[: held.shape[0]]
        return projector
    return projector


def take_for_load(projectors: MutableMapping[str, torch.Tensor], name: str, incoming: torch.Tensor) -> torch.Tensor:
    """Before ``load_state_dict`` copies ``incoming`` into adapter ``name``'s projector: the tensor to copy.

    A shared projector is written in place by a load, which would change every adapter on its storage. So
    an ``incoming`` value that agrees with the held one (within :data:`SHARE_TOLERANCE`) is replaced by the
    held tensor (the copy changes nothing, the share stays); one that differs gets a private copy of the
    storage first (that adapter keeps exactly its file's ``P``, the others keep theirs).
    """
    held = projectors[name]
    if held.is_meta or not any(shares_storage(held, other) for key, other in projectors.items() if key != name):
        return incoming
    if _close(incoming.to(held.device, held.dtype), held):
        return held
    projectors[name] = held.clone()
    return incoming


def apply_keeping_shares(tensors: list[torch.Tensor], fn: Callable[[torch.Tensor], torch.Tensor]
                         ) -> Callable[[torch.Tensor], torch.Tensor]:
    """``fn`` (a ``Module._apply`` function: a move or cast) made to keep shares: each root is moved once and
    every tensor on its storage becomes the leading rows of the moved root (so a device move of a layer
    holding ``n`` adapters' shared ``P`` makes one copy, not ``n``)."""
    moved = {root.untyped_storage().data_ptr(): (root, fn(root)) for root in roots(dict(enumerate(tensors)))}

    def apply(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.is_meta or tensor.untyped_storage().data_ptr() not in moved:
            return fn(tensor)
        root, result = moved[tensor.untyped_storage().data_ptr()]
        return result if tensor.shape == root.shape else result[: tensor.shape[0]]

    return apply
