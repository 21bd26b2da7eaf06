"""PiCa → LoRA export is exact (issue 5, first part)."""

import pytest
import torch
from peft import PeftModel, get_peft_model

from pica import PiCaConfig
from pica.export import export_lora
from tests.conftest import (
    MODEL_FACTORIES,
    example_inputs,
    model_output,
    pica_layers,
    randomize_updates,
)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("share", [True, False])
def test_exported_lora_reproduces_logits_and_delta_weights(kind, share, tmp_path):
    head = ["classifier"] if kind == "bert" else None
    model = get_peft_model(MODEL_FACTORIES[kind](), PiCaConfig(rank=4, share_across_layers=share, modules_to_save=head))
    randomize_updates(model)
    if head:
        with torch.no_grad():
            model.base_model.model.classifier.modules_to_save["default"].weight.normal_()
    expected = model_output(model, example_inputs(kind))
    export_lora(model, tmp_path / "lora")
    lora = PeftModel.from_pretrained(MODEL_FACTORIES[kind](), tmp_path / "lora")
    assert lora.peft_config["default"].peft_type == "LORA"
    assert (model_output(lora, example_inputs(kind)) - expected).abs().max() <= 1e-5
    lora_layers = {name: module for name, module in lora.named_modules() if hasattr(module, "lora_A")}
    for name, layer in pica_layers(model).items():
        assert torch.equal(lora_layers[name].get_delta_weight("default").T if kind == "gpt2"
                           else lora_layers[name].get_delta_weight("default"), layer.get_delta_weight("default"))


def test_exports_the_named_adapter_and_refuses_existing_dir(tmp_path):
    model = get_peft_model(MODEL_FACTORIES["llama"](), PiCaConfig(rank=4))
    model.add_adapter("other", PiCaConfig(rank=2, target_modules=["q_proj"]))
    model.set_adapter("other")
    randomize_updates(model)
    expected = model_output(model, example_inputs("llama"))
    export_lora(model, tmp_path / "lora", adapter_name="other")
    lora = PeftModel.from_pretrained(MODEL_FACTORIES["llama"](), tmp_path / "lora")
    assert lora.peft_config["default"].r == 2
    assert (model_output(lora, example_inputs("llama")) - expected).abs().max() <= 1e-5
    with pytest.raises(FileExistsError, match="exists"):
        export_lora(model, tmp_path / "lora", adapter_name="other")
    with pytest.raises(ValueError, match="no PiCa adapter"):
        export_lora(model, tmp_path / "x", adapter_name="missing")
    assert not (tmp_path / "x").exists()


def test_overwrite_replaces_a_previous_export(tmp_path):
    model = get_peft_model(MODEL_FACTORIES["llama"](), PiCaConfig(rank=4))
    export_lora(model, tmp_path / "lora")
    randomize_updates(model)
    expected = model_output(model, example_inputs("llama"))
    export_lora(model, tmp_path / "lora", overwrite=True)
    lora = PeftModel.from_pretrained(MODEL_FACTORIES["llama"](), tmp_path / "lora")
    assert (model_output(lora, example_inputs("llama")) - expected).abs().max() <= 1e-5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora"]
