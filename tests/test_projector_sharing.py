"""Projector sharing, single process: the assignment, the cost estimate, the option (the exchange itself:
tests/distributed/test_rank0_loading.py)."""

from __future__ import annotations

import pytest
import torch

from pica.projector_batch import top_right_singular_vectors_many
from pica.projector_sharing import (
    SHARING_ENVIRONMENT_VARIABLE,
    assign_shares,
    compute_projectors,
    projector_cost,
    projector_sharing,
    projector_sharing_enabled,
)


def test_assignment_is_largest_first_to_the_least_loaded_rank():
    costs = [1.0, 5.0, 3.0, 3.0, 2.0]
    # 5 -> r0; 3 (index 2) -> r1; 3 (index 3) -> r1 (3 < 5); 2 -> r0 (5 < 6); 1 -> r0 or r1: r1 (6 vs 7)
    assert assign_shares(costs, 2) == [1, 0, 1, 1, 0]
    assert assign_shares(costs, 1) == [0] * 5
    assert assign_shares([], 3) == []
    with pytest.raises(ValueError, match="world_size"):
        assign_shares(costs, 0)


def test_assignment_balances_a_gemma_shaped_stack():
    shapes = [(2048, 2048), (256, 2048), (256, 2048), (16384, 2048), (2048, 16384)] * 4
    costs = [projector_cost(shape) for shape in shapes]
    owners = assign_shares(costs, 2)
    loads = [sum(c for c, o in zip(costs, owners) if o == r) for r in range(2)]
    assert max(loads) / (sum(loads) / 2) < 1.01  # within 1% of a perfect split
    assert projector_cost((2048, 16384)) == projector_cost((16384, 2048))  # the Gram of the smaller side
    assert 0.3 < projector_cost((2048, 2048)) / projector_cost((16384, 2048)) < 0.6  # measured 0.45


def test_the_option_reads_the_context_then_the_environment(monkeypatch):
    monkeypatch.delenv(SHARING_ENVIRONMENT_VARIABLE, raising=False)
    assert projector_sharing_enabled()
    for value, expected in (("0", False), ("off", False), ("False", False), ("1", True), ("yes", True)):
        monkeypatch.setenv(SHARING_ENVIRONMENT_VARIABLE, value)
        assert projector_sharing_enabled() is expected, value
    monkeypatch.setenv(SHARING_ENVIRONMENT_VARIABLE, "0")
    with projector_sharing(True):
        assert projector_sharing_enabled()
        with projector_sharing(False):
            assert not projector_sharing_enabled()
        assert projector_sharing_enabled()
    assert not projector_sharing_enabled()


def test_without_a_process_group_it_is_the_batch_computation():
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(24, 16, generator=generator), torch.randn(8, 20, generator=generator)]
    fingerprints = [torch.zeros(9, dtype=torch.float64)] * 2
    got = compute_projectors(weights, 4, torch.float32, fingerprints)
    expected = top_right_singular_vectors_many(weights, 4, torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert compute_projectors([], 4, torch.float32, []) == []
