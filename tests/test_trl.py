"""TRL: ``SFTTrainer(model=..., peft_config=PiCaConfig(...))`` trains, saves and reloads (issue 5)."""

import torch
from datasets import Dataset
from peft import PeftModel
from trl import SFTConfig, SFTTrainer

from pica import PiCaConfig
from pica.tuner.layer import PiCaLayer
from tests.conftest import make_llama, make_tokenizer, model_output, update_ids_by_group

SENTENCES = [
    "the cat is big and the dog is small",
    "one two three four five six seven eight",
    "the bird sat on the tree in the sun",
    "what is two and two ? the answer is four",
    "the red fish and the blue fish eat",
    "how many dogs ? the answer is three",
]


def test_sft_trainer_trains_saves_and_reloads_a_pica_adapter(tmp_path):
    tokenizer = make_tokenizer()
    data = Dataset.from_dict({"text": SENTENCES * 4})
    args = SFTConfig(output_dir=str(tmp_path / "run"), max_steps=8, per_device_train_batch_size=4, learning_rate=1e-2,
                     logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
                     max_length=16, bf16=False)  # SFTConfig defaults to bf16 autocast; fp32 for exact checks
    trainer = SFTTrainer(model=make_llama(), args=args, train_dataset=data, processing_class=tokenizer,
                         peft_config=PiCaConfig(rank=4))
    model = trainer.model
    assert isinstance(model, PeftModel) and any(isinstance(m, PiCaLayer) for m in model.modules())
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".pica_M." in name for name in trainable)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 8 and losses[-1] < losses[0], losses
    assert all(ids for ids in update_ids_by_group(model).values())
    assert all(len(ids) == 1 for ids in update_ids_by_group(model).values())  # still shared after training

    trainer.save_model(str(tmp_path / "adapter"))
    inputs = tokenizer(SENTENCES[:2], return_tensors="pt", padding=True)
    model.eval()
    expected = model_output(model, {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]})
    reloaded = PeftModel.from_pretrained(make_llama(), tmp_path / "adapter")
    got = model_output(reloaded, {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]})
    assert torch.allclose(got, expected, atol=1e-6)
    base = model_output(make_llama(), {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]})
    assert (got - base).abs().max() > 1e-3  # the trained update is really in the file
