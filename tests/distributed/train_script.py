"""Train a tiny Llama with PiCa through transformers ``Trainer``; launched by ``torchrun`` from the tests.

Usage: ``torchrun --nproc_per_node=K -m tests.distributed.train_script OUT_DIR GLOBAL_BATCH STEPS [MODE]``.
Each process gets ``GLOBAL_BATCH / K`` sequences per step (gloo backend, CPU). Rank 0 writes
``OUT_DIR/run.json`` (losses, world size, wrapper class); every rank writes
``OUT_DIR/updates_rank{RANK}.safetensors`` (every distinct ``M``). ``MODE`` is
``ddp`` (default) or ``fsdp`` (``FSDP_POLICY`` env: ``transformer_layer`` or ``none``).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from datasets import Dataset
from peft import get_peft_model
from safetensors.torch import save_file
from transformers import Trainer, TrainingArguments

import pica
from tests.conftest import make_llama, pica_layers


def updates_by_group(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {layer.pica_group["default"]: layer.get_update("default").detach().clone()
            for layer in pica_layers(model).values()}


def token_dataset(size: int = 64, length: int = 12) -> Dataset:
    generator = torch.Generator().manual_seed(11)
    ids = torch.randint(1, 96, (size, length), generator=generator)  # equal lengths: no padding
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def main(out_dir: str, global_batch: int, steps: int, mode: str = "ddp") -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    model = get_peft_model(make_llama(), pica.PiCaConfig(rank=4))
    extra = {}
    if mode == "fsdp":
        policy = os.environ.get("FSDP_POLICY", "transformer_layer")
        extra = {"fsdp": "full_shard", "fsdp_config": {"cpu_ram_efficient_loading": False, "use_orig_params": True,
                 **({"transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]} if policy == "transformer_layer" else {})}}
    args = TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=global_batch // world, max_steps=steps, learning_rate=1e-2,
        lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[], seed=0, use_cpu=True,
        ddp_backend="gloo" if world > 1 else None, dataloader_num_workers=0, disable_tqdm=True, **extra,
    )
    trainer = Trainer(model=model, args=args, train_dataset=token_dataset())
    trainer.train()
    rank = int(os.environ.get("RANK", "0"))
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    save_file(updates_by_group(trainer.model), os.path.join(out_dir, f"updates_rank{rank}.safetensors"))
    if trainer.is_world_process_zero():
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        Path(out_dir, "run.json").write_text(json.dumps(
            {"losses": losses, "world_size": world, "wrapper": type(trainer.model_wrapped).__name__}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), *(sys.argv[4:5]))
