"""Train a tiny Llama with PiCa through transformers ``Trainer``; launched by ``torchrun`` from the tests.

Usage: ``torchrun --nproc_per_node=K -m tests.distributed.train_script OUT_DIR GLOBAL_BATCH STEPS``.
Each process gets ``GLOBAL_BATCH / K`` sequences per step (gloo backend, CPU; ``Trainer`` wraps the
model in DDP). Rank 0 writes ``OUT_DIR/run.json`` (losses, world size, wrapper class); every rank writes
``OUT_DIR/updates_rank{RANK}.safetensors`` (every distinct ``M``, by parameter name). FSDP is not
run through ``Trainer`` here: with ``use_cpu=True`` it ignores ``fsdp`` (see ``fsdp_script``).

The script ends with a barrier and ``Trainer.end()`` (which destroys the process group). Without it
the gloo process group outlives ``main`` and is torn down during interpreter shutdown, while its
background threads may still be running; a worker then occasionally aborts with "terminate called
without an active exception" (SIGABRT) after training has finished.
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
from tests.conftest import make_llama
from tests.distributed.worker import run


def updates_by_name(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every distinct ``M`` by parameter name (``named_parameters`` lists a shared one once)."""
    return {name: parameter.detach().clone() for name, parameter in model.named_parameters() if "pica_M" in name}




def token_dataset(size: int = 64, length: int = 12) -> Dataset:
    generator = torch.Generator().manual_seed(11)
    ids = torch.randint(1, 96, (size, length), generator=generator)  # equal lengths: no padding
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def main(out_dir: str, global_batch: int, steps: int) -> None:
    """Train ``steps`` steps of ``global_batch`` sequences split over the processes; write the results."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    model = get_peft_model(make_llama(), pica.PiCaConfig(rank=4))
    args = TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=global_batch // world, max_steps=steps, learning_rate=1e-2,
        lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[], seed=0, use_cpu=True,
        ddp_backend="gloo" if world > 1 else None, dataloader_num_workers=0, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=token_dataset())
    trainer.train()
    rank = int(os.environ.get("RANK", "0"))
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    save_file(updates_by_name(trainer.model), os.path.join(out_dir, f"updates_rank{rank}.safetensors"))
    if trainer.is_world_process_zero():
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        Path(out_dir, "run.json").write_text(json.dumps(
            {"losses": losses, "world_size": world, "wrapper": type(trainer.model_wrapped).__name__}))
    trainer.accelerator.wait_for_everyone()  # every rank has written its files
    trainer.end()  # destroys the process group (a no-op without torch.distributed)
    assert not torch.distributed.is_initialized()


if __name__ == "__main__":
    run(main, sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
