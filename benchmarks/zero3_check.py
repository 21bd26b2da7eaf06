"""PiCa under DeepSpeed ZeRO-3 on CPU (2 processes, gloo) against one process. Prints one JSON object.

    DS_ACCELERATOR=cpu PYTHONPATH=src python benchmarks/zero3_check.py [--out FILE]

deepspeed is not a dependency of pica (it is published as source only); install it in a throwaway environment
(``DS_BUILD_OPS=0 pip install deepspeed``). The script launches each variant as its own
``torch.distributed.run --nproc_per_node=2`` job (``DS_ACCELERATOR=cpu``, gloo, one thread per rank, a
time limit), so a variant that crashes or hangs is recorded and the others still run.

Every variant: a tiny Llama (``tests.conftest.make_llama``, seed 0, random weights), ``get_peft_model(
PiCaConfig(rank=4))``, ``deepspeed.initialize`` with a ZeRO stage-3 config (every parameter partitioned, ``M``
included; the optimizer is torch's ``AdamW`` handed to deepspeed), 3 steps on half of a fixed batch per rank;
each group's ``M`` gathered (``deepspeed.zero.GatheredParameters``) and compared with one process (no
deepspeed) training on the whole batch: max over groups of ‖M − M_1proc‖_F / ‖M_1proc‖_F; every ``P`` compared
bitwise with the one-process ``P``; the log of pica's projector sharing (the process group is up when
``get_peft_model`` runs, so ranks holding the same whole weights share the projector work).

``whole_weights``
    The base is built normally on every rank (every rank holds every weight), the adapter created on it, then
    ``deepspeed.initialize`` partitions the model (ZeRO-3 without ``zero.Init``).
``zero_init``
    The base is built as transformers builds it under a ZeRO-3 config (``HfDeepSpeedConfig`` alive, then
    ``AutoModelForCausalLM.from_config``: inside ``deepspeed.zero.Init``), so each rank holds a partition of
    each weight and the module's ``weight`` is a ``(0,)`` placeholder; the reference weights are written into
    it as ``from_pretrained`` does (gathered, rank 0 modifies). Then ``get_peft_model`` directly on the
    partitioned base: what happens is recorded (no training if it raises).
``zero_init_gathered``
    As ``zero_init``, but ``get_peft_model`` runs inside ``deepspeed.zero.GatheredParameters`` over every
    targeted weight, so ``P`` is computed from whole weights; then trained.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import os
import shlex
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("whole_weights", "zero_init", "zero_init_gathered")
STEPS, LR, RANK, BATCH, SEQUENCE = 3, 1e-2, 4, 4, 12
TIME_LIMIT_S = 300


def _ds_config(world_size: int) -> dict:
    return {
        "train_batch_size": BATCH,
        "train_micro_batch_size_per_gpu": BATCH // world_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "zero_allow_untested_optimizer": True,  # torch's AdamW, not deepspeed's (its CPU Adam needs a built op)
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,  # partition even tiny tensors
                              "stage3_max_live_parameters": 0, "stage3_prefetch_bucket_size": 0},
        "fp16": {"enabled": False}, "bf16": {"enabled": False},
        "wall_clock_breakdown": False,
    }


def _batch():
    import torch

    generator = torch.Generator().manual_seed(1)
    return torch.randint(1, 96, (BATCH, SEQUENCE), generator=generator)


def _reference() -> dict:
    """One process, no deepspeed: the whole batch, plain AdamW. ``M`` by group key, ``P`` by layer name."""
    import torch
    from peft import get_peft_model

    import pica
    from tests.conftest import make_llama

    model = get_peft_model(make_llama(), pica.PiCaConfig(rank=RANK))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    batch = _batch()
    for _ in range(STEPS):
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return {"M": _updates(model, gather=False), "P": _projectors(model),
            "base": {k: v.clone() for k, v in make_llama().state_dict().items()}}


def _updates(model, gather: bool) -> dict:
    """Each group's ``M`` in full (gathered from its ZeRO-3 partitions if ``gather``), by its parameter name."""
    import contextlib

    named = {name.removeprefix("module."): p for name, p in model.named_parameters() if "pica_M" in name}
    if gather:
        import deepspeed

        context = deepspeed.zero.GatheredParameters(list(named.values()), modifier_rank=None)
    else:
        context = contextlib.nullcontext()
    with context:
        return {name: p.detach().clone() for name, p in named.items()}


def _projectors(model) -> dict:
    return {name: buffer.detach().clone() for name, buffer in model.named_buffers() if "pica_P" in name}


def _worker(variant: str, out: str) -> None:
    faulthandler.dump_traceback_later(TIME_LIMIT_S - 30, exit=True)
    import deepspeed
    import torch
    import torch.distributed as dist
    from peft import get_peft_model

    import pica
    from pica.projector_sharing import projector_sharing
    from tests.conftest import llama_config

    torch.set_num_threads(1)
    with projector_sharing(False):
        reference = _reference()  # before any process group: one process's numbers
    deepspeed.init_distributed(dist_backend="gloo")
    sharing_log: list[str] = []  # whether get_peft_model shared the projector work across the ranks, and how
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: sharing_log.append(record.getMessage())
    logging.getLogger("pica.projector_sharing").addHandler(handler)
    logging.getLogger("pica.projector_sharing").setLevel(logging.INFO)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    config = _ds_config(world_size)
    result: dict = {"variant": variant, "world_size": world_size, "deepspeed": deepspeed.__version__,
                    "accelerator": deepspeed.get_accelerator().device_name(),
                    "communication_backend": deepspeed.get_accelerator().communication_backend_name()}
    stage = "build the base"
    try:
        if variant == "whole_weights":
            from tests.conftest import make_llama

            base = make_llama()
        else:
            from transformers import AutoModelForCausalLM
            from transformers.integrations import HfDeepSpeedConfig

            # As under Trainer / accelerate with a ZeRO-3 config: transformers builds the model inside
            # deepspeed.zero.Init and gathers each partition to initialise it (its own zero.Init call).
            hf_deepspeed_config = HfDeepSpeedConfig(config)  # noqa: F841  (transformers keeps a weakref to it)
            base = AutoModelForCausalLM.from_config(llama_config(), dtype=torch.float32).eval()
            weights = dict(base.named_parameters())
            result["placeholder_weight_shape"] = list(weights["model.layers.0.self_attn.q_proj.weight"].shape)
            with deepspeed.zero.GatheredParameters(list(weights.values()), modifier_rank=0):
                if rank == 0:  # as from_pretrained under ZeRO-3: rank 0 writes, the others receive
                    with torch.no_grad():
                        for name, value in weights.items():
                            value.copy_(reference["base"][name])
        stage = "get_peft_model"
        targets = [module.weight for name, module in base.named_modules()
                   if name.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")]
        if variant == "zero_init_gathered":
            with deepspeed.zero.GatheredParameters(targets, modifier_rank=None):
                model = get_peft_model(base, pica.PiCaConfig(rank=RANK))
        else:
            model = get_peft_model(base, pica.PiCaConfig(rank=RANK))
        result["projector_sharing_log"] = sharing_log
        projectors = _projectors(model)
        result["P_bitwise_one_process"] = all(torch.equal(projectors[k], reference["P"][k]) for k in reference["P"])
        result["P_max_abs_difference"] = max(float((projectors[k].double() - reference["P"][k].double()).abs().max())
                                             for k in reference["P"])
        stage = "deepspeed.initialize"
        trainable = [p for p in model.parameters() if p.requires_grad]
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(trainable, lr=LR),
                                               config=config)
        result["M_partitioned"] = {name: list(p.shape) for name, p in model.named_parameters() if "pica_M" in name}
        stage = "train"
        half = _batch().chunk(world_size)[rank]
        losses = []
        for _ in range(STEPS):
            loss = engine(input_ids=half, labels=half).loss
            engine.backward(loss)
            engine.step()
            losses.append(float(loss))
        result["losses_this_rank"] = losses
        stage = "compare"
        updates = _updates(model, gather=True)
        errors = {key: float((updates[key] - reference["M"][key]).norm() / reference["M"][key].norm())
                  for key in reference["M"]}
        result["relative_error_by_group"] = errors
        result["max_relative_error"] = max(errors.values())
        result["M_changed"] = min(float(reference["M"][k].norm()) for k in reference["M"]) > 0
        result["outcome"] = "ran"
    except Exception as error:  # recorded; both ranks fail the same way in every case seen so far
        result.update(outcome="raised", stage=stage, error=f"{type(error).__name__}: {error}",
                      traceback=traceback.format_exc(limit=8)[-3000:])
    gathered = [None] * world_size
    dist.all_gather_object(gathered, result)
    if rank == 0:
        Path(out).write_text(json.dumps(gathered, indent=1, default=str))
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _run_variant(variant: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.json")
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")])}
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
                   str(Path(__file__).resolve()), "--worker", variant, "--worker-out", out]
        try:
            done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=TIME_LIMIT_S)
        except subprocess.TimeoutExpired as expired:
            return {"outcome": "timed out", "seconds": TIME_LIMIT_S, "stderr_tail": str(expired.stderr)[-3000:]}
        if not os.path.exists(out):
            return {"outcome": "crashed", "returncode": done.returncode, "stderr_tail": done.stderr[-4000:]}
        ranks = json.loads(Path(out).read_text())
        return {"returncode": done.returncode, "ranks": ranks,
                "warnings": sorted({line.strip() for line in done.stderr.splitlines()
                                    if "warn" in line.lower()})[:20]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        sys.path[:0] = [str(ROOT / "src"), str(ROOT)]
        _worker(args.worker, args.worker_out)
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import emit, machine_info

    info = machine_info()
    info["command"] = "DS_ACCELERATOR=cpu " + " ".join(shlex.quote(a) for a in ["python", *sys.argv])
    try:
        import deepspeed

        info["deepspeed"] = deepspeed.__version__
    except Exception as error:  # deepspeed missing or failing to import: that is the result
        info["deepspeed_import_error"] = f"{type(error).__name__}: {error}"
        print(json.dumps(info, indent=1))
        return
    import peft
    import transformers

    info.update(transformers=transformers.__version__, peft=peft.__version__, steps=STEPS, lr=LR, rank=RANK,
                batch=BATCH, sequence=SEQUENCE)
    report = {"machine": info, "variants": {variant: _run_variant(variant) for variant in args.variants}}
    emit(report, args.out)


if __name__ == "__main__":
    main()
