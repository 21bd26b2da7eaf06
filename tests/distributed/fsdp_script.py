"""FSDP with PiCa's shared ``M``: which wrapping policies work. Launched by ``torchrun`` from the tests.

Usage: ``torchrun --nproc_per_node=2 -m tests.distributed.fsdp_script OUT.json``. For each variant
(FSDP1/FSDP2 x one unit for the whole model / one unit per decoder layer x shared/unshared ``M``)
it runs 3 AdamW steps on half of a fixed batch per process (gloo, CPU) and records either the
relative difference of every ``M`` to a single-process run on the whole batch, or the error raised.
transformers ``Trainer`` cannot be used here: with ``use_cpu=True`` it ignores ``fsdp`` and uses DDP.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from peft import get_peft_model
from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from torch.distributed.tensor import DTensor
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

import pica
from tests.conftest import make_llama

STEPS = 3


def _model(share: bool) -> torch.nn.Module:
    return get_peft_model(make_llama(), pica.PiCaConfig(rank=4, share_across_layers=share))


def _train(model: torch.nn.Module, batch: torch.Tensor) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(STEPS):
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def _updates(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    updates = {}
    for name, parameter in model.named_parameters():
        if "pica_M" in name:
            full = parameter.full_tensor() if isinstance(parameter, DTensor) else parameter
            updates[name.replace("_fsdp_wrapped_module.", "")] = full.detach().clone()  # copy: FSDP1 frees views
    return updates


def _wrap(model: torch.nn.Module, engine: str, per_layer: bool) -> torch.nn.Module:
    if engine == "fsdp2":
        if per_layer:
            for layer in model.base_model.model.model.layers:
                fully_shard(layer)
        fully_shard(model)
        return model
    policy = ModuleWrapPolicy({LlamaDecoderLayer}) if per_layer else None
    return FullyShardedDataParallel(model, auto_wrap_policy=policy, device_id=torch.device("cpu"), use_orig_params=True)


def main(out_file: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    batch = torch.randint(1, 96, (4, 12), generator=torch.Generator().manual_seed(1))  # (global batch, length)
    local = batch.chunk(world)[rank]
    results = {}
    for share in (True, False):
        reference = _model(share)
        _train(reference, batch)
        expected = _updates(reference)
        for engine in ("fsdp1", "fsdp2"):
            for per_layer in (False, True):
                policy = "per_decoder_layer" if per_layer else "whole_model"
                name = f"{engine}/{policy}/{'shared' if share else 'unshared'}"
                try:
                    model = _wrap(_model(share), engine, per_layer)
                    _train(model, local)
                    if engine == "fsdp1":
                        with FullyShardedDataParallel.summon_full_params(model):
                            got = _updates(model)
                    else:
                        got = _updates(model)
                    assert set(got) == set(expected), (sorted(got)[:3], sorted(expected)[:3])
                    error = max(float((got[k] - expected[k]).norm() / expected[k].norm()) for k in expected)
                    results[name] = {"ok": True, "max_relative_difference": error}
                except Exception as exc:  # noqa: BLE001  (recorded for the test to inspect)
                    results[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
                dist.barrier()
    if rank == 0:
        with open(out_file, "w") as handle:
            json.dump(results, handle, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
