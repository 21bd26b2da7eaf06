"""FSDP with PiCa: training matches one process, state dicts round-trip, the example config wraps per layer.

Launched by the tests: ``torchrun --nproc_per_node=2 -m tests.distributed.fsdp_script OUT.json``
(gloo, CPU). Rank 0 writes ``OUT.json`` with three sections:

``train``
    For each variant ``{fsdp1,fsdp2}/{whole_model,per_decoder_layer}/{shared,unshared}``: 3 AdamW
    steps on half of a fixed batch per process, compared with a single-process run on the whole batch
    (``max_relative_difference`` over the groups' ``M``), the FSDP units and the unit holding each
    ``M``; or the error raised. FSDP1 per layer uses peft's ``fsdp_auto_wrap_policy`` (what
    transformers' ``Trainer`` installs for a PEFT model), FSDP2 per layer is ``fully_shard`` on every
    decoder layer, then on the root.
``round_trip``
    After the FSDP1 per-layer training: ``get_peft_model_state_dict`` of the full state dict
    (``FULL_STATE_DICT``, as accelerate gathers it before ``save_pretrained``), then
    ``set_peft_model_state_dict`` onto a fresh FSDP1-wrapped model; whether every ``M`` and the logits
    are identical (see :func:`_round_trip` for the key selection).
``config``
    The auto-wrap policies ``examples/accelerate_fsdp.yaml`` implies (accelerate's own and peft's,
    built from the environment ``accelerate launch`` would set), applied with FSDP1: the units and the
    unit of each ``M``.

transformers ``Trainer`` cannot run FSDP here: with ``use_cpu=True`` it ignores ``fsdp`` and uses DDP.
Every collective is reached by both ranks (errors are raised symmetrically by both), and the script
ends with a barrier and ``destroy_process_group``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.distributed as dist
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.utils.other import fsdp_auto_wrap_policy
from torch import nn
from torch.distributed.fsdp import (
    FSDPModule,
    FullStateDictConfig,
    FullyShardedDataParallel,
    StateDictType,
    fully_shard,
)
from torch.distributed.tensor import DTensor
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

import pica
from tests.conftest import make_llama
from tests.distributed.accelerate_config import config_policies, wrapped_by
from tests.distributed.worker import publish, run, start

STEPS = 3
LR = 1e-2
FSDP1_PREFIX = "_fsdp_wrapped_module."




def _model(share: bool) -> PeftModel:
    return get_peft_model(make_llama(), pica.PiCaConfig(rank=4, share_across_layers=share))


def _train(model: nn.Module, batch: torch.Tensor) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    for _ in range(STEPS):
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def _clean(name: str) -> str:
    return name.replace(FSDP1_PREFIX, "")


def _full_updates(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every ``M`` in full, by its name in the unwrapped model (FSDP1 params must be summoned first)."""
    updates = {}
    for name, parameter in model.named_parameters():
        if "pica_M" in name:
            full = parameter.full_tensor() if isinstance(parameter, DTensor) else parameter
            updates[_clean(name)] = full.detach().clone()  # copy: FSDP1 frees the summoned views
    return updates


def _gathered_updates(model: nn.Module, engine: str) -> dict[str, torch.Tensor]:
    if engine == "fsdp1":
        with FullyShardedDataParallel.summon_full_params(model):
            return _full_updates(model)
    return _full_updates(model)


def _units(model: nn.Module) -> dict[str, Any]:
    """The FSDP units (``""`` is the root), how many are decoder layers, and the unit holding each ``M``."""
    units, decoder_layers = [], 0
    for name, module in model.named_modules():
        if isinstance(module, FullyShardedDataParallel):
            units.append(_clean(name).removesuffix("."))
            decoder_layers += isinstance(module.module, LlamaDecoderLayer)
        elif isinstance(module, FSDPModule):
            units.append(name)
            decoder_layers += isinstance(module, LlamaDecoderLayer)
    assert "" in units, units  # the root is always a unit

    def unit_of(parameter_name: str) -> str:
        return max((u for u in units if u == "" or parameter_name.startswith(u + ".")), key=len)

    holders = {_clean(name): unit_of(_clean(name)) for name, _ in model.named_parameters() if "pica_M" in name}
    return {"units": sorted(units), "decoder_layer_units": decoder_layers, "update_units": holders}


def _fsdp1(model: nn.Module, policy: Callable | None) -> FullyShardedDataParallel:
    return FullyShardedDataParallel(model, auto_wrap_policy=policy, device_id=torch.device("cpu"),
                                    use_orig_params=True)


def _wrap(model: PeftModel, engine: str, per_layer: bool) -> nn.Module:
    if engine == "fsdp2":
        if per_layer:
            for layer in model.base_model.model.model.layers:
                fully_shard(layer)
        fully_shard(model)
        return model
    return _fsdp1(model, fsdp_auto_wrap_policy(model) if per_layer else None)


def _full_state_dict(model: FullyShardedDataParallel) -> AbstractContextManager:
    """Full (unsharded) state dicts on every rank. ``offload_to_cpu=False``: with the parameters already on
    CPU, ``offload_to_cpu=True`` makes FSDP1 (torch 2.13) clone freed storage and segfault."""
    return FullyShardedDataParallel.state_dict_type(
        model, StateDictType.FULL_STATE_DICT, FullStateDictConfig(offload_to_cpu=False, rank0_only=False))


def _round_trip(trained: FullyShardedDataParallel, share: bool, batch: torch.Tensor,
                info: dict[str, Any]) -> dict[str, Any]:
    """Save the adapter of an FSDP1 per-layer model as accelerate does, load it onto a fresh one, compare.

    ``selected_as_trainer``: the entries ``get_peft_model_state_dict`` selects from the gathered full state
    dict given the wrapped model (what ``Trainer.save_model`` -> ``save_pretrained(state_dict=...)``
    does; pica strips every ``_fsdp_wrapped_module.`` segment, peft 0.21.2 only a leading one), compared
    with the entries selected through an unwrapped twin (same architecture, clean module names); those
    are then loaded inside ``summon_full_params`` (outside it peft would strip ``base_model.model.``
    from the keys of a wrapper and pica refuses the load). ``info``
    receives the selection counts as soon as they are known (kept if the load raises).
    """
    expected = _gathered_updates(trained, "fsdp1")
    with _full_state_dict(trained):
        full = trained.state_dict()
    as_trainer = get_peft_model_state_dict(trained.module, state_dict=full)
    saved = get_peft_model_state_dict(_model(share), state_dict=full)  # structure from a clean twin
    saved_updates = {key: value for key, value in saved.items() if "pica_M" in key}
    info.update(selected_as_trainer=len(as_trainer), selected_by_twin=len(saved), saved_updates=len(saved_updates))
    assert len(saved_updates) == len(expected), (sorted(saved_updates), sorted(expected))
    fresh = _wrap(_model(share), "fsdp1", per_layer=True)
    refused = ""
    try:  # outside summon_full_params peft would strip "base_model.model." and drop P and fingerprints
        with _full_state_dict(fresh):
            set_peft_model_state_dict(fresh, as_trainer)
    except ValueError as error:
        refused = str(error)
    with FullyShardedDataParallel.summon_full_params(fresh):  # full parameters under their plain names
        loaded = set_peft_model_state_dict(fresh, as_trainer)
    got = _gathered_updates(fresh, "fsdp1")
    with torch.no_grad():
        logits_trained = trained(input_ids=batch).logits
        logits_loaded = fresh(input_ids=batch).logits
    return {
        "ok": True, **info, "refused_outside_summon": refused,
        "unexpected_keys": sorted(getattr(loaded, "unexpected_keys", [])),
        "updates_identical": set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in expected),
        "saved_match_trained": sorted(float(v.norm()) for v in saved_updates.values())
        == sorted(float(v.norm()) for v in expected.values()),
        "logits_identical": bool(torch.equal(logits_trained, logits_loaded)),
        "max_logit_difference": float((logits_trained - logits_loaded).abs().max()),
        "updates_nonzero": all(float(v.abs().max()) > 1e-3 for v in expected.values()),
    }


def _error(exc: Exception) -> dict[str, Any]:
    return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000]}


def main(out_file: str) -> None:
    """Run every variant (see the module docstring); rank 0 writes ``out_file``."""
    rank, batch, local = start()
    results: dict[str, dict[str, Any]] = {"train": {}, "round_trip": {}, "config": {}}
    for share in (True, False):
        sharing = "shared" if share else "unshared"
        reference = _model(share)
        _train(reference, batch)
        expected = _full_updates(reference)
        for engine in ("fsdp1", "fsdp2"):
            for per_layer in (False, True):
                name = f"{engine}/{'per_decoder_layer' if per_layer else 'whole_model'}/{sharing}"
                model = None
                try:
                    model = _wrap(_model(share), engine, per_layer)
                    units = _units(model)
                    _train(model, local)
                    got = _gathered_updates(model, engine)
                    assert set(got) == set(expected), (sorted(got)[:3], sorted(expected)[:3])
                    error = max(float((got[k] - expected[k]).norm() / expected[k].norm()) for k in expected)
                    results["train"][name] = {"ok": True, "max_relative_difference": error, "groups": len(got),
                                              **units}
                except Exception as exc:  # noqa: BLE001  (recorded for the test to inspect)
                    results["train"][name] = _error(exc)
                    model = None
                dist.barrier()
                if engine == "fsdp1" and per_layer:
                    info: dict[str, Any] = {}
                    try:
                        assert model is not None, "training failed: " + results["train"][name]["error"]
                        results["round_trip"][name] = _round_trip(model, share, batch, info)
                    except Exception as exc:  # noqa: BLE001
                        results["round_trip"][name] = {**_error(exc), **info}
                    dist.barrier()
        for source in ("accelerate", "peft"):
            name = f"fsdp1/{source}_policy/{sharing}"
            try:
                model = _model(share)
                policy = config_policies(model)[source]
                results["config"][name] = {"ok": True, "policy_wraps": wrapped_by(policy, model),
                                           **_units(_fsdp1(model, policy))}
            except Exception as exc:  # noqa: BLE001
                results["config"][name] = _error(exc)
            dist.barrier()
    publish(results, out_file)


if __name__ == "__main__":
    run(main, sys.argv[1])
