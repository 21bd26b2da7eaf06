"""End to end with transformers: Trainer, generate, gradient checkpointing, load_adapter (DESIGN §4.9)."""

import torch
from datasets import Dataset
from peft import get_peft_model
from transformers import Trainer, TrainingArguments

from pica import PiCaConfig
from tests.conftest import (
    example_inputs,
    make_llama,
    model_output,
    pica_layers,
    randomize_updates,
)


def _lm_dataset(n: int = 32) -> Dataset:
    generator = torch.Generator().manual_seed(0)
    starts = torch.randint(1, 40, (n,), generator=generator)
    rows = [{"input_ids": [int(s) + i for i in range(12)], "labels": [int(s) + i for i in range(12)]} for s in starts]
    return Dataset.from_list(rows)


def test_trainer_lowers_the_loss(tmp_path):
    model = get_peft_model(make_llama(), PiCaConfig(rank=8))
    data = _lm_dataset()
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, learning_rate=1e-2,
                             max_steps=12, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                             disable_tqdm=True, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    before = trainer.evaluate(eval_dataset=data)["eval_loss"]
    trainer.train()
    after = trainer.evaluate(eval_dataset=data)["eval_loss"]
    assert after < before - 0.1, (before, after)
    layers = pica_layers(model)
    assert all(layer.get_update("default").abs().sum() > 0 for layer in layers.values())


def test_generate_runs_and_matches_base_at_init():
    base = make_llama()
    prompt = example_inputs("llama")["input_ids"][:1]
    expected = base.generate(prompt, max_new_tokens=5, do_sample=False)
    model = get_peft_model(base, PiCaConfig(rank=4))
    assert torch.equal(model.generate(input_ids=prompt, max_new_tokens=5, do_sample=False), expected)
    randomize_updates(model, scale=1.0)
    assert model.generate(input_ids=prompt, max_new_tokens=5, do_sample=False).shape == (1, 12)


def _update_grads(checkpointing: bool) -> list[torch.Tensor]:
    base = make_llama()
    if checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(base, PiCaConfig(rank=4))
    randomize_updates(model)
    model.train()
    inputs = example_inputs("llama")
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    return [p.grad.clone() for p in model.parameters() if p.requires_grad]


def test_gradient_checkpointing_gives_the_same_gradients():
    plain, checkpointed = _update_grads(False), _update_grads(True)
    assert len(plain) == 5
    for a, b in zip(plain, checkpointed):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)


def test_transformers_load_adapter_is_refused_and_points_to_peft(tmp_path):
    """transformers injects through peft's inject_adapter_in_model, which keeps no tuner (where M lives)."""
    import pytest

    model = get_peft_model(make_llama(), PiCaConfig(rank=4))
    randomize_updates(model)
    model.save_pretrained(tmp_path)
    base = make_llama()
    reference = model_output(base, example_inputs("llama"))
    state = {k: v.clone() for k, v in base.state_dict().items()}
    for call in (lambda: base.load_adapter(str(tmp_path)),
                 lambda: base.load_adapter(peft_config=PiCaConfig(rank=4), adapter_state_dict={})):
        with pytest.raises(ValueError, match=r"peft\.PeftModel\.from_pretrained"):
            call()
        assert not hasattr(base, "peft_config") and base.state_dict().keys() == state.keys()
    assert torch.equal(model_output(base, example_inputs("llama")), reference)


def test_raw_load_state_dict_of_another_bases_fingerprint_is_refused():
    """Loads that bypass PeftModel.from_pretrained are checked when they happen, not at the next forward."""
    import pytest

    model = get_peft_model(make_llama(), PiCaConfig(rank=4))
    other = get_peft_model(make_llama(seed=5), PiCaConfig(rank=4))
    adapter_only = {k: v for k, v in other.state_dict().items() if ".pica_" in k}
    with pytest.raises(ValueError, match="different base weight"):
        model.load_state_dict(adapter_only, strict=False)
    model.load_state_dict({k: v for k, v in adapter_only.items() if "fingerprint" not in k}, strict=False)  # M, P: fine
