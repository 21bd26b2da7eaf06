"""pica.sharded_state without a process group: plain tensors pass through; FSDP1's broadcast mark is trusted
only with an orthonormal P (the DTensor paths: tests/distributed/test_rank0_loading.py)."""

from __future__ import annotations

import torch

from pica.projector import top_right_singular_vectors
from pica.sharded_state import broadcast_by_fsdp1, full_weight, local_entries, replicate_entries


def _marked(tensor: torch.Tensor) -> torch.Tensor:
    tensor._fsdp_synced = True  # what FSDP1's sync_module_states sets on each buffer it broadcast
    return tensor


def test_plain_tensors_pass_through():
    weight = torch.randn(4, 3)
    assert full_weight(weight) is weight
    state = {"a.pica_P.default": weight, "a.base_layer.weight": weight}
    replicate_entries(state, "a.pica_", weight)  # the reference is not sharded: nothing to do
    local_entries(state, "a.pica_")
    assert all(value is weight for value in state.values())


def test_fsdp1_broadcast_is_trusted_only_when_marked_and_orthonormal():
    projector = top_right_singular_vectors(torch.randn(8, 6, generator=torch.Generator().manual_seed(0)), 3)
    fingerprint = torch.ones(9, dtype=torch.float64)
    assert not broadcast_by_fsdp1(projector.clone(), fingerprint.clone())  # never broadcast
    assert broadcast_by_fsdp1(_marked(projector.clone()), _marked(fingerprint.clone()))
    assert not broadcast_by_fsdp1(_marked(projector.clone()), fingerprint.clone())  # both must be marked
    assert not broadcast_by_fsdp1(_marked(torch.zeros(3, 6)), _marked(fingerprint.clone()))  # uninitialised storage
    assert not broadcast_by_fsdp1(_marked(projector.clone()), _marked(torch.full((9,), float("nan"), dtype=torch.float64)))
