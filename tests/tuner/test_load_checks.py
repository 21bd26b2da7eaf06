"""The load path refuses what the config does not account for and restores the model exactly on any error."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.utils import ModulesToSaveWrapper
from safetensors.torch import load_file, save_file

from pica import PiCaConfig, export_merged
from pica.io import AdapterFileError
from tests.conftest import (example_inputs, make_bert_classifier, make_llama, model_output, pica_layers,
                            randomize_updates)

WEIGHTS = "adapter_model.safetensors"


def _saved(path, factory=make_llama, **config):
    model = get_peft_model(factory(), PiCaConfig(rank=4, **config))
    randomize_updates(model, seed=6)
    model.save_pretrained(path)
    return model


def _state(model) -> dict:
    return {"types": [(n, type(m)) for n, m in model.named_modules()],
            "keys": list(model.state_dict()), "grad": [p.requires_grad for p in model.parameters()],
            "attributes": sorted(vars(model))}


@pytest.mark.parametrize("extra", ["model.layers.0.self_attn.q_proj.base_layer.weight", "lm_head.weight"])
def test_base_model_tensors_in_the_file_are_refused_not_loaded(extra, tmp_path):
    _saved(tmp_path)
    tensors = load_file(tmp_path / WEIGHTS)
    tensors[f"base_model.model.{extra}"] = torch.zeros(32, 32) if "q_proj" in extra else torch.zeros(96, 32)
    save_file(tensors, tmp_path / WEIGHTS)
    base = make_llama()
    before, logits = _state(base), model_output(base, example_inputs("llama"))
    with pytest.raises(AdapterFileError, match="does not account for.*" + extra.replace(".", r"\.")):
        PeftModel.from_pretrained(base, tmp_path)
    assert _state(base) == before and torch.equal(model_output(base, example_inputs("llama")), logits)


def test_a_config_covering_fewer_layers_than_the_file_is_refused(tmp_path):
    _saved(tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "layers_to_transform": [0], "layers_pattern": "layers"}))
    with pytest.raises(AdapterFileError, match=r"does not account for.*layers\.1\."):
        PeftModel.from_pretrained(make_llama(), tmp_path)


def test_missing_modules_to_save_tensors_restore_the_head(tmp_path):
    _saved(tmp_path, make_bert_classifier, modules_to_save=["classifier"])
    tensors = load_file(tmp_path / WEIGHTS)
    save_file({k: v for k, v in tensors.items() if "classifier" not in k}, tmp_path / WEIGHTS)
    base = make_bert_classifier()
    before = _state(base)
    with pytest.raises(AdapterFileError, match="classifier"):
        PeftModel.from_pretrained(base, tmp_path)
    assert _state(base) == before
    assert not any(isinstance(m, ModulesToSaveWrapper) for m in base.modules()) and not hasattr(base, "peft_config")


def test_failed_second_adapter_load_leaves_the_peft_model_as_it_was(tmp_path):
    _saved(tmp_path / "a")
    _saved(tmp_path / "b", target_modules=["q_proj"])
    tensors = load_file(tmp_path / "b" / WEIGHTS)
    tensors["base_model.model.lm_head.weight"] = torch.zeros(96, 32)
    save_file(tensors, tmp_path / "b" / WEIGHTS)
    model = PeftModel.from_pretrained(make_llama(), tmp_path / "a", is_trainable=True)
    before, logits = _state(model), model_output(model, example_inputs("llama"))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    layer_before = (dict(layer.rank), list(layer.pica_P), list(layer.active_adapters))
    with pytest.raises(AdapterFileError):
        model.load_adapter(tmp_path / "b", adapter_name="b")
    assert _state(model) == before and set(model.peft_config) == {"default"} and "b" not in model.base_model.pica_M
    assert (dict(layer.rank), list(layer.pica_P), list(layer.active_adapters)) == layer_before
    assert torch.equal(model_output(model, example_inputs("llama")), logits)


def test_refused_safe_merge_changes_no_layer():
    model = get_peft_model(make_llama(), PiCaConfig(rank=4))
    randomize_updates(model, seed=1)
    with torch.no_grad():
        model.base_model.pica_M["default"]["model/layers/*/mlp/down_proj"][0, 0] = float("inf")
    weights = {n: l.get_base_layer().weight.clone() for n, l in pica_layers(model).items()}
    for merge in (lambda: model.merge_adapter(safe_merge=True), lambda: model.merge_and_unload(safe_merge=True)):
        with pytest.raises(ValueError, match="nothing merged"):
            merge()
        assert all(not layer.merged for layer in pica_layers(model).values())
        assert all(torch.equal(l.get_base_layer().weight, weights[n]) for n, l in pica_layers(model).items())


def test_export_merged_of_a_merged_model_writes_w0_plus_delta_once(tmp_path):
    from transformers import AutoModelForCausalLM

    model = get_peft_model(make_llama(), PiCaConfig(rank=4))
    randomize_updates(model, seed=2)
    model.add_adapter("b", PiCaConfig(rank=2, target_modules=["q_proj"]))
    randomize_updates(model, seed=3)  # both adapters random
    model.set_adapter("default")
    expected = model_output(model, example_inputs("llama"))
    model.base_model.merge_adapter(["default", "b"])  # the live model holds W0 + ΔA + ΔB
    export_merged(model, tmp_path / "a")
    logits = model_output(AutoModelForCausalLM.from_pretrained(tmp_path / "a"), example_inputs("llama"))
    assert torch.allclose(logits, expected, atol=1e-5)
