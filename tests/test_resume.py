"""A transformers Trainer run stopped at a checkpoint and resumed gives the uninterrupted run's final M
and loss curve (checkpoints go through PiCa's atomic save and checked load)."""

from __future__ import annotations

import torch
from peft import get_peft_model
from transformers import Trainer, TrainerCallback, TrainingArguments

from pica import PiCaConfig
from tests.conftest import make_llama
from tests.distributed.train_script import token_dataset, updates_by_name

STEPS, STOP_AT = 8, 4


class StopAt(TrainerCallback):
    """Stop training after ``step`` (the checkpoint of that step is still written)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
        return control


def _trainer(output_dir, callbacks=()) -> Trainer:
    model = get_peft_model(make_llama(), PiCaConfig(rank=4))
    args = TrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=4, max_steps=STEPS, learning_rate=1e-2,
        lr_scheduler_type="linear", warmup_steps=2, logging_steps=1, save_strategy="steps", save_steps=STOP_AT,
        report_to=[], seed=0, use_cpu=True, disable_tqdm=True, dataloader_num_workers=0,
    )
    return Trainer(model=model, args=args, train_dataset=token_dataset(), callbacks=list(callbacks))


def _losses(trainer: Trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_resumed_run_reproduces_uninterrupted_run(tmp_path):
    full = _trainer(tmp_path / "full")
    full.train()

    stopped = _trainer(tmp_path / "resumed", callbacks=[StopAt(STOP_AT)])
    stopped.train()
    assert stopped.state.global_step == STOP_AT
    checkpoint = tmp_path / "resumed" / f"checkpoint-{STOP_AT}"
    assert (checkpoint / "adapter_model.safetensors").is_file() and not (checkpoint / "adapter_model.bin").exists()
    midway = updates_by_name(stopped.model)

    resumed = _trainer(tmp_path / "resumed")  # fresh model, M = 0 until the checkpoint is loaded
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == STEPS

    final, expected = updates_by_name(resumed.model), updates_by_name(full.model)
    assert set(final) == set(expected) and len(final) == 5
    for group in expected:
        assert not torch.equal(midway[group], expected[group])  # the second half did train
        assert torch.equal(final[group], expected[group]), (group, float((final[group] - expected[group]).abs().max()))
    assert _losses(resumed) == _losses(full) and len(_losses(full)) == STEPS
