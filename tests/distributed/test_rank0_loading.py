"""Rank-0 loading (FSDP2 through torch's and accelerate's loaders, FSDP1 simulated on CPU) and projectors
computed once across ranks.

One ``torchrun --nproc_per_node=2`` launch (gloo, CPU) of :mod:`tests.distributed.rank0_script`, ~30 s.
Marked ``multiprocess`` (deselect with ``-m "not multiprocess"``).
"""

from __future__ import annotations

import json

import pytest

from tests.distributed.test_multiprocess import FSDP_TOLERANCE, _torchrun

pytestmark = pytest.mark.multiprocess


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("rank0") / "rank0.json"
    _torchrun(2, "tests.distributed.rank0_script", str(out))
    return json.loads(out.read_text())


LOADERS = ["torch", "accelerate", "fsdp1_simulated"]


@pytest.mark.parametrize("loader", LOADERS)
def test_rank0_loading_gives_every_rank_rank0s_projectors_and_trains_like_one_process(results, loader):
    """Rank 0 holds the weights, rank 1 a meta-device model; after sharding and the loader, both hold rank 0's
    P and fingerprints bitwise (= one process's), and 3 AdamW steps match one process. ``fsdp1_simulated``:
    FSDP1's sync_module_states broadcast, on CPU with its GPU-only guard disabled (the script says why)."""
    total = results["total_projectors"]
    rank0, rank1 = results[f"rank0/{loader}"]
    for rank in (rank0, rank1):
        assert rank.get("ok", True), rank.get("error")
        assert rank["layers"] == total == 10
        assert rank["P_bitwise"] and rank["fingerprints_bitwise"], rank
        assert rank["unset_after_training"] == 0, rank  # every P filled
        assert rank["groups"] == 5
        assert rank["max_relative_difference"] <= FSDP_TOLERANCE, rank
    assert rank0["computed_here"] == total and rank0["unset_after_get_peft_model"] == 0
    assert rank1["computed_here"] == 0  # nothing to compute on the meta rank: no sharing, rank 0 does all
    assert rank1["unset_after_get_peft_model"] == rank1["unset_before_load"] == total
    # torch / accelerate: the load hook clears the mark; FSDP1 broadcasts in place, so it is cleared at first use
    assert rank1["unset_after_load"] == (total if loader == "fsdp1_simulated" else 0), rank1


@pytest.mark.parametrize("loader", LOADERS)
def test_a_meta_rank_projector_refuses_use_until_loaded(results, loader):
    """On the meta rank, before the load, P is never mistaken for a real one: using it raises the message that
    says how to fill it."""
    message = results[f"rank0/{loader}"][1]["use_before_load"]
    assert "was never computed" in message and "broadcast_from_rank0=True" in message, message


@pytest.mark.parametrize("section", ["sharing", "sharing/after_failure"])
def test_ranks_with_the_same_weights_share_the_projector_work_bitwise(results, section):
    """Each rank computes a disjoint share (together: every projector once) and every P is bitwise what one
    process computes, on every rank; after a failed attempt the process group still works."""
    total = results["total_projectors"]
    ranks = results[section]
    assert all(rank["ok"] for rank in ranks), ranks
    assert sum(rank["computed_here"] for rank in ranks) == total
    assert all(0 < rank["computed_here"] < total for rank in ranks)
    assert all(rank["P_bitwise"] and rank["fingerprints_bitwise"] and rank["layers"] == total for rank in ranks)


def test_ranks_with_different_weights_compute_their_own(results):
    ranks = results["sharing/different_weights"]
    total = results["total_projectors"]
    assert all(rank["ok"] and rank["computed_here"] == total and rank["P_bitwise"] for rank in ranks), ranks


def test_a_failure_in_one_ranks_share_raises_on_every_rank(results):
    """Rank 1 fails inside its share: both ranks raise (no rank left waiting in a broadcast), naming rank 1."""
    ranks = results["sharing/failure"]
    assert [rank["ok"] for rank in ranks] == [False, False], ranks
    for rank in ranks:
        assert rank["error"].startswith("RuntimeError: PiCa projectors shared across 2 ranks failed on rank(s) [1]")
        assert "simulated failure" in rank["error"]
