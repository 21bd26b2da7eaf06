"""PiCa's per-layer buffers next to FSDP2-sharded weights (``DTensor``): what state-dict loaders need.

FSDP2 (``fully_shard``) turns parameters into ``DTensor`` shards and leaves buffers alone, so a PiCa layer's
``P`` and fingerprints stay plain tensors beside a sharded base weight. Two loaders of rank 0's full state
dict then need help:

* accelerate's ``fsdp2_load_full_state_dict`` (``cpu_ram_efficient_loading``) reads ``.device_mesh`` and
  ``.placements`` of every entry of the sharded model's state dict: :func:`replicate_entries` presents the
  buffers there as replicated ``DTensor`` s on the weight's mesh, and :func:`local_entries` turns what is
  loaded back into plain tensors before it reaches the buffers.
* a fingerprint of a sharded weight needs the whole weight: :func:`full_weight`.

FSDP1 rank-0 loading (``sync_module_states=True``) instead broadcasts every parameter and buffer from rank 0
in place when it wraps the model, running no load hook: :func:`broadcast_by_fsdp1` tells a layer that
its ``P`` arrived that way.

This module is pure torch: it imports neither ``peft`` nor ``transformers``.
"""

from __future__ import annotations

import torch

try:  # torch built without distributed support has no DTensor
    from torch.distributed.tensor import DTensor, Replicate
except ImportError:  # pragma: no cover
    DTensor, Replicate = None, None

__all__ = ["broadcast_by_fsdp1", "full_weight", "local_entries", "replicate_entries"]

_FSDP1_SYNCED = "_fsdp_synced"  # torch.distributed.fsdp._init_utils.FSDP_SYNCED: set on each buffer it broadcast


def _is_dtensor(tensor: object) -> bool:
    return DTensor is not None and isinstance(tensor, DTensor)


def full_weight(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` whole: a sharded ``DTensor`` is gathered (a collective: every rank of its mesh must call
    this for the same weight), anything else is returned as it is."""
    return weight.full_tensor() if _is_dtensor(weight) else weight


def replicate_entries(state_dict: dict[str, torch.Tensor], prefix: str, reference: torch.Tensor) -> None:
    """In place: every plain tensor of ``state_dict`` under ``prefix`` becomes a replicated ``DTensor`` on the
    mesh of ``reference``, if ``reference`` is a ``DTensor`` (no communication: each rank wraps its own copy).

    Args:
        state_dict: a module's state dict (being built by ``state_dict()``).
        prefix: key prefix of the entries to present, e.g. ``"...q_proj.pica_"``.
        reference: the sharded tensor whose mesh to use (e.g. the layer's base weight).
    """
    if not _is_dtensor(reference):
        return
    mesh = reference.device_mesh
    for key, value in state_dict.items():
        if key.startswith(prefix) and isinstance(value, torch.Tensor) and not _is_dtensor(value):
            state_dict[key] = DTensor.from_local(value, mesh, [Replicate()] * mesh.ndim, run_check=False)


def local_entries(state_dict: dict[str, torch.Tensor], prefix: str) -> None:
    """In place: every ``DTensor`` of ``state_dict`` under ``prefix`` becomes a plain tensor: its local copy if
    replicated (no communication), else the gathered whole (a collective)."""
    for key, value in state_dict.items():
        if key.startswith(prefix) and _is_dtensor(value):
            replicated = all(placement.is_replicate() for placement in value.placements)
            state_dict[key] = value.to_local() if replicated else value.full_tensor()


def broadcast_by_fsdp1(projector: torch.Tensor, fingerprint: torch.Tensor) -> bool:
    """Whether FSDP1's ``sync_module_states`` broadcast filled ``projector`` and ``fingerprint`` from rank 0.

    FSDP1 marks every buffer it broadcast (``_fsdp_synced``). Rank 0's ``P`` must also have orthonormal rows:
    a broadcast of a rank 0 that itself never computed ``P`` (uninitialised storage) is not trusted.

    Args:
        projector: ``(rank, in_features)`` ``P`` buffer.
        fingerprint: ``(FINGERPRINT_SIZE,)`` fingerprint buffer.
    """
    if not all(getattr(tensor, _FSDP1_SYNCED, False) and not tensor.is_meta for tensor in (projector, fingerprint)):
        return False
    rows = projector.detach().double()  # (rank, in_features)
    identity = torch.eye(rows.shape[0], dtype=torch.float64, device=rows.device)
    return bool(torch.isfinite(fingerprint).all()) and float((rows @ rows.T - identity).abs().max()) < 1e-4
