"""Rank-0 loading under FSDP2 and projectors computed once, with 2 CPU processes.

Launched by the tests: ``torchrun --nproc_per_node=2 -m tests.distributed.rank0_script OUT.json``
(gloo, CPU). Rank 0 writes ``OUT.json``; every section compares each rank's state with a single-process
reference that each rank builds itself with projector sharing off (same seed, same thread count).

``rank0/torch`` and ``rank0/accelerate``
    Rank 0 builds the tiny Llama with its weights, rank 1 on the meta device (what transformers does for
    accelerate's ``cpu_ram_efficient_loading``); both ``get_peft_model``. ``torch``: ``fully_shard`` each
    decoder layer then the root, rank 1 ``to_empty``, then rank 0's full state dict goes out through
    ``set_model_state_dict(..., StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))``.
    ``accelerate``: the steps of accelerate's ``fsdp2_prepare_model`` with ``cpu_ram_efficient_loading``
    (state dict, non-persistent buffers kept, model to meta, per-layer / embedding / tail / root units), then
    accelerate's ``fsdp2_load_full_state_dict`` itself (on CPU accelerate never selects FSDP, so
    ``Accelerator.prepare`` cannot run it).
    ``fsdp1_simulated``: FSDP1 with ``sync_module_states=True`` (see :func:`_fsdp1_loader`). Recorded: whether ``P`` and fingerprints of every layer are bitwise
    rank 0's and the single-process ones, what using ``P`` raised on rank 1 before the load, how many projectors
    each rank computed, and 3 AdamW steps on half of a fixed batch each against one process on the whole batch.
``sharing``
    Every rank builds the same model: the projectors each rank computed (disjoint, covering all) and
    whether every ``P`` is bitwise the single-process one. ``different_weights``: ranks with different
    weights do not share. ``failure``: one rank fails inside its share: what each rank raised.
"""

from __future__ import annotations

import sys
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist
from peft import PeftModel, get_peft_model
from peft.utils.other import fsdp_auto_wrap_policy
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
from transformers import LlamaForCausalLM

import pica
import pica.projector_sharing as sharing
from pica.tuner.layer import pica_layers
from tests.conftest import llama_config, make_llama
from tests.distributed.fsdp_script import _clean, _full_updates, _gathered_updates, _train
from tests.distributed.worker import publish, run, start


def _config() -> pica.PiCaConfig:
    return pica.PiCaConfig(rank=4)


def _reference() -> PeftModel:
    """The single-process model: this rank's own computation, no collective."""
    with sharing.projector_sharing(False):
        return get_peft_model(make_llama(), _config())


class _Counter:
    """Wraps the projector computation that :mod:`pica.projector_sharing` calls: how many matrices this rank computed."""

    def __init__(self) -> None:
        self.count = 0
        self.original = sharing.top_right_singular_vectors_many

    def __enter__(self) -> "_Counter":
        def counted(weights, *args, **kwargs):
            self.count += len(weights)
            return self.original(weights, *args, **kwargs)

        sharing.top_right_singular_vectors_many = counted
        return self

    def __exit__(self, *exc: object) -> None:
        sharing.top_right_singular_vectors_many = self.original


def _restore_rotary(model: nn.Module) -> None:
    """Non-persistent rotary buffers computed from the config (never in a state dict; garbage after ``to_empty``)."""
    rotary = model.get_submodule("base_model.model.model.rotary_emb")
    fresh = type(rotary)(config=llama_config())
    for name, buffer in fresh.named_buffers():
        rotary.register_buffer(name, buffer, persistent=False)


def _rank0_base(rank: int) -> LlamaForCausalLM:
    """Rank 0: the weights (seed 0, as :func:`_reference`); other ranks: the same model on the meta device."""
    if rank == 0:
        return make_llama()
    with torch.device("meta"):
        return LlamaForCausalLM(llama_config()).eval()


def _buffers(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {_clean(name): (layer.pica_P["default"].detach().clone(), layer.pica_fingerprint["default"].detach().clone())
            for name, layer in pica_layers(model)}


def _compare_buffers(got: dict, expected: dict) -> dict[str, Any]:
    same_p = set(got) == set(expected) and all(torch.equal(got[k][0], expected[k][0]) for k in expected)
    same_fp = set(got) == set(expected) and all(torch.equal(got[k][1], expected[k][1]) for k in expected)
    return {"layers": len(got), "P_bitwise": same_p, "fingerprints_bitwise": same_fp}


def _unset(model: nn.Module) -> int:
    return sum(len(layer.pica_unset) for _, layer in pica_layers(model))


def _use_before_load(model: nn.Module) -> str:
    """What using ``P`` of the first layer raises (empty if nothing)."""
    _, layer = next(pica_layers(model))
    try:
        layer.check_projector("default")
    except RuntimeError as error:
        return str(error)
    return ""


def _torch_loader(model: PeftModel, rank: int) -> tuple[nn.Module, dict[str, Any]]:
    """Shard per decoder layer and root, materialise on the meta rank, broadcast rank 0's full state dict."""
    full = {key: value.detach().clone() for key, value in model.state_dict().items()} if rank == 0 else {}
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    info: dict[str, Any] = {}
    if rank != 0:
        model.to_empty(device="cpu")
        _restore_rotary(model)
        info["unset_before_load"] = _unset(model)
        info["use_before_load"] = _use_before_load(model)
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return model, info


def _accelerate_loader(model: PeftModel, rank: int) -> tuple[nn.Module, dict[str, Any]]:
    """The steps of accelerate's ``fsdp2_prepare_model`` under ``cpu_ram_efficient_loading`` (no mixed precision,
    no offload, ``transformer_layer_cls_to_wrap`` = the decoder layer), then its ``fsdp2_load_full_state_dict``."""
    import copy

    from accelerate.utils.fsdp_utils import fsdp2_load_full_state_dict, get_non_persistent_buffers

    info: dict[str, Any] = {}
    if rank != 0:
        _restore_rotary(model)  # transformers computes these from the config on every rank
        info["unset_before_load"] = _unset(model)
        info["use_before_load"] = _use_before_load(model)
    original_sd = model.state_dict()
    kept = get_non_persistent_buffers(model, recurse=True, fqns=True)
    non_persistent = copy.deepcopy({key: value for key, value in model.named_buffers() if key in kept})
    model = model.to(torch.device("meta"))
    for layer in model.base_model.model.model.layers:  # the auto-wrap policy, bottom up
        fully_shard(layer)
    fully_shard(model.get_input_embeddings())
    inner = model.base_model.model
    fully_shard([inner.model.norm, inner.lm_head], reshard_after_forward=False)
    fully_shard(model)
    fsdp2_load_full_state_dict(SimpleNamespace(is_main_process=rank == 0), model, original_sd)
    for key, buffer in non_persistent.items():
        parent, name = key.rsplit(".", 1)
        model.get_submodule(parent).register_buffer(name, buffer, persistent=False)
    return model, info


def _fsdp1_loader(model: PeftModel, rank: int) -> tuple[nn.Module, dict[str, Any]]:
    """FSDP1 rank-0 loading: peft's per-layer policy, ``sync_module_states=True``, the meta rank materialised by
    ``to_empty`` (accelerate's ``param_init_fn``). FSDP1 refuses CPU tensors for that broadcast ("requires them
    to be on GPU"); that guard alone is disabled here (the broadcast itself runs on gloo) to see what pica does."""
    import torch.distributed.fsdp._init_utils as init_utils

    info: dict[str, Any] = {}
    if rank != 0:
        info["unset_before_load"] = _unset(model)
        info["use_before_load"] = _use_before_load(model)
    guard = init_utils._check_module_states_for_sync_module_states
    init_utils._check_module_states_for_sync_module_states = lambda states: None
    try:
        wrapped = FullyShardedDataParallel(
            model, auto_wrap_policy=fsdp_auto_wrap_policy(model), device_id=torch.device("cpu"), use_orig_params=True,
            sync_module_states=True, param_init_fn=None if rank == 0 else lambda m: m.to_empty(device="cpu", recurse=False))
    finally:
        init_utils._check_module_states_for_sync_module_states = guard
    return wrapped, info


def _rank0_loading(loader: str, rank: int, expected: dict, expected_updates: dict, local: torch.Tensor
                   ) -> dict[str, Any]:
    with _Counter() as counter:
        model = get_peft_model(_rank0_base(rank), _config())
    info = {"computed_here": counter.count, "unset_after_get_peft_model": _unset(model)}
    model, loaded = {"torch": _torch_loader, "accelerate": _accelerate_loader, "fsdp1_simulated": _fsdp1_loader}[
        loader](model, rank)
    info.update(loaded, unset_after_load=_unset(model))  # FSDP1: cleared at first use (no load hook runs)
    info.update(_compare_buffers(_buffers(model), expected))
    _train(model, local)
    info["unset_after_training"] = _unset(model)
    got = _gathered_updates(model, "fsdp1" if loader == "fsdp1_simulated" else "fsdp2")
    info["max_relative_difference"] = max(float((got[k] - expected_updates[k]).norm() / expected_updates[k].norm())
                                          for k in expected_updates)
    info["groups"] = len(got)
    return info


def _shared(rank: int, expected: dict, fail_on: int | None = None, seed: int = 0) -> dict[str, Any]:
    original = sharing.top_right_singular_vectors_many

    def failing(weights, *args, **kwargs):
        raise ValueError("simulated failure in this rank's share")

    if fail_on == rank:
        sharing.top_right_singular_vectors_many = failing
    try:
        with _Counter() as counter:
            model = get_peft_model(make_llama(seed), _config())
        return {"ok": True, "computed_here": counter.count, **_compare_buffers(_buffers(model), expected)}
    except Exception as error:  # noqa: BLE001 (recorded for the test)
        return {"ok": False, "error": f"{type(error).__name__}: {error}"}
    finally:
        sharing.top_right_singular_vectors_many = original


def _run(results: dict, key: str, rank: int, function, *args) -> None:
    """Every rank runs ``function``; rank 0 records every rank's result (or error) under ``key``."""
    try:
        outcome = function(*args)
    except Exception as error:  # noqa: BLE001
        outcome = {"ok": False, "error": f"{type(error).__name__}: {error}"[:3000]}
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, outcome)
    results[key] = gathered


def main(out_file: str) -> None:
    """Run every section (see the module docstring); rank 0 writes ``out_file``."""
    rank, batch, local = start()
    reference = _reference()
    expected = _buffers(reference)
    _train(reference, batch)
    expected_updates = _full_updates(reference)
    results: dict[str, Any] = {"total_projectors": len(expected)}
    for loader in ("torch", "accelerate", "fsdp1_simulated"):
        _run(results, f"rank0/{loader}", rank, _rank0_loading, loader, rank, expected, expected_updates, local)
        dist.barrier()
    _run(results, "sharing", rank, _shared, rank, expected)
    with sharing.projector_sharing(False):
        own = _buffers(get_peft_model(make_llama(seed=rank), _config()))
    _run(results, "sharing/different_weights", rank, _shared, rank, own, None, rank)
    _run(results, "sharing/failure", rank, _shared, rank, expected, 1)
    _run(results, "sharing/after_failure", rank, _shared, rank, expected)  # the group still works
    publish(results, out_file)


if __name__ == "__main__":
    run(main, sys.argv[1])
