"""QLoRA-style training of PiCa: Trainer + prepare_model_for_kbit_training + gradient checkpointing on a 4-bit base."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from peft import get_peft_model, prepare_model_for_kbit_training
from transformers import Trainer, TrainingArguments

from pica import PiCaConfig
from tests.quantized_fixtures import load_quantized, save_llama, bnb_layout  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("bnb_layout")  # both 4-bit layouts (tests/quantized_fixtures.py)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_llama(tmp_path_factory.mktemp("llama"))


def _lm_dataset(n: int = 32) -> Dataset:
    generator = torch.Generator().manual_seed(0)
    starts = torch.randint(1, 40, (n,), generator=generator)
    rows = [{"input_ids": [int(s) + i for i in range(12)], "labels": [int(s) + i for i in range(12)]} for s in starts]
    return Dataset.from_list(rows)


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_trainer_on_a_quantised_base_trains_only_m_and_modules_to_save(llama_dir, scheme, tmp_path):
    base = prepare_model_for_kbit_training(load_quantized(llama_dir, scheme), use_gradient_checkpointing=True,
                                           gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(base, PiCaConfig(rank=8, modules_to_save=["lm_head"]))
    assert model.base_model.model.is_gradient_checkpointing
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert trainable and all(".pica_M." in name or ".modules_to_save." in name for name in trainable), trainable
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    data = _lm_dataset()
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, learning_rate=1e-2,
                             max_steps=10, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    loss_before = trainer.evaluate(eval_dataset=data)["eval_loss"]
    trainer.train()
    loss_after = trainer.evaluate(eval_dataset=data)["eval_loss"]
    assert loss_after < loss_before - 0.1, (loss_before, loss_after)
    after = model.state_dict()
    assert after.keys() == before.keys()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(".pica_M." in name or ".modules_to_save." in name for name in changed), changed
    packed = [name for name in before if name.endswith("base_layer.weight")]
    assert packed and all(before[name].dtype in (torch.uint8, torch.int8) for name in packed)  # compared bitwise above
