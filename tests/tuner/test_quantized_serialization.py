"""Adapters trained on quantised bases: save/load, the full-precision serving path, the fingerprint rule, export."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from pica import PiCaConfig, export_merged
from pica.io import AdapterFileError
from pica.base_weights import base_weight_out_in
from tests.conftest import pica_layers, randomize_updates
from tests.quantized_fixtures import load_quantized, save_llama, bnb_layout  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("bnb_layout")  # both 4-bit layouts (tests/quantized_fixtures.py)

INPUTS = torch.randint(1, 96, (2, 7), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_llama(tmp_path_factory.mktemp("llama"))


def _trained(llama_dir, scheme: str, tmp_path, storage: str = "full"):
    """A PiCa adapter with random M on the ``scheme`` base, saved; returns (model, logits, adapter dir)."""
    model = get_peft_model(load_quantized(llama_dir, scheme), PiCaConfig(rank=4, projector_storage=storage))
    randomize_updates(model)
    with torch.no_grad():
        logits = model(INPUTS).logits
    model.save_pretrained(tmp_path / "adapter")
    return model, logits, tmp_path / "adapter"


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(INPUTS).logits


@pytest.mark.parametrize("scheme, storage", [("nf4", "full"), ("nf4", "compact"), ("int8", "full"), ("int8", "compact"), ("fp4", "full")])
def test_save_load_onto_a_freshly_quantised_base_gives_identical_logits(llama_dir, scheme, storage, tmp_path):
    _, logits, adapter = _trained(llama_dir, scheme, tmp_path, storage)
    loaded = PeftModel.from_pretrained(load_quantized(llama_dir, scheme), adapter)
    assert torch.equal(_logits(loaded), logits)
    recorded = json.loads((adapter / "adapter_config.json").read_text())["base_quantization"]
    assert recorded["method"] == ("bitsandbytes_8bit" if scheme == "int8" else "bitsandbytes_4bit")


@pytest.mark.parametrize("scheme, storage", [("nf4", "full"), ("nf4", "compact"), ("int8", "full")])
def test_adapter_trained_quantised_loads_onto_the_full_precision_weights_with_a_warning(llama_dir, scheme, storage,
                                                                                        tmp_path, caplog):
    model, _, adapter = _trained(llama_dir, scheme, tmp_path, storage)
    with caplog.at_level(logging.WARNING, logger="pica.tuner.plan"):
        served = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), adapter)
    message = " ".join(record.getMessage() for record in caplog.records)
    assert "trained on a quantised base" in message and "relative weight distance" in message
    trained, loaded = pica_layers(model), pica_layers(served)
    for name, layer in loaded.items():  # the P trained with, also when recomputed (compact: sketch checked)
        assert torch.equal(layer.pica_P["default"], trained[name].pica_P["default"]), name
        assert torch.equal(layer.get_update("default"), trained[name].get_update("default"))
        base = layer.get_base_layer()
        x = torch.randn(3, layer.in_features)
        expected = x @ (base.weight + layer.get_delta_weight("default")).T  # full-precision W0 + M P
        assert torch.allclose(layer(x), expected, atol=1e-5), name


@pytest.mark.parametrize("base", ["fp32", "nf4"])
def test_a_different_model_of_the_same_shapes_is_still_refused(llama_dir, base, tmp_path):
    _, _, adapter = _trained(llama_dir, "nf4", tmp_path)
    other = save_llama(tmp_path / "other", seed=1)
    model = AutoModelForCausalLM.from_pretrained(other) if base == "fp32" else load_quantized(other, "nf4")
    with pytest.raises(AdapterFileError, match="trained on a different base model"):
        PeftModel.from_pretrained(model, adapter)
    assert not pica_layers(model)


def test_another_quantisation_than_recorded_is_refused_naming_both(llama_dir, tmp_path):
    _, _, adapter = _trained(llama_dir, "nf4", tmp_path)
    model = load_quantized(llama_dir, "int8")
    with pytest.raises(AdapterFileError, match=r"base_quantization does not match .*bitsandbytes_8bit.*trained as .*nf4"):
        PeftModel.from_pretrained(model, adapter)
    assert not pica_layers(model)


def test_export_merged_from_a_4bit_base_writes_full_precision_dequantised_weights(llama_dir, tmp_path, caplog,
                                                                                   bnb_layout):  # noqa: F811
    model, logits, _ = _trained(llama_dir, "nf4", tmp_path)
    layers = pica_layers(model)
    with caplog.at_level(logging.WARNING, logger="pica.export"):
        out = export_merged(model, tmp_path / "merged")
    assert "full-precision checkpoint of the de-quantised weights" in caplog.text
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    plain = AutoModelForCausalLM.from_pretrained(out)
    for name, module in plain.named_modules():
        layer = layers.get(f"base_model.model.{name}")
        if layer is not None:
            expected = base_weight_out_in(layer.get_base_layer()) + layer.get_delta_weight("default")
            assert module.weight.dtype == torch.float32 and torch.allclose(module.weight, expected, atol=1e-6), name
    if bnb_layout == "unpacked":
        assert torch.allclose(_logits(plain), logits, atol=1e-4)
    else:  # bitsandbytes's packed kernel computes in bf16: the fp32 export agrees to bf16 rounding
        assert float((_logits(plain) - logits).abs().max()) <= 1e-2 * float(logits.abs().max())


def test_a_full_precision_adapter_on_a_quantised_base_says_why_it_is_refused(llama_dir, tmp_path):
    from peft import get_peft_model

    from pica import PiCaConfig

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(llama_dir), PiCaConfig(rank=4))
    model.save_pretrained(tmp_path / "fp32-adapter")
    quantised = load_quantized(llama_dir, "nf4")
    with pytest.raises(AdapterFileError, match="this base is quantised: if the adapter was trained on full-precision weights"):
        PeftModel.from_pretrained(quantised, tmp_path / "fp32-adapter")
    assert not pica_layers(quantised)


def test_export_merged_from_an_8bit_base_writes_the_dtype_de_quantisation_gives(llama_dir, tmp_path):
    model, _, _ = _trained(llama_dir, "int8", tmp_path)
    layers = pica_layers(model)
    out = export_merged(model, tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(out)
    checked = 0
    for name, module in plain.named_modules():
        layer = layers.get(f"base_model.model.{name}")
        if layer is not None:
            expected = base_weight_out_in(layer.get_base_layer()) + layer.get_delta_weight("default")
            assert module.weight.dtype == expected.dtype == torch.float32, name  # not rounded to fp16
            assert torch.equal(module.weight, expected), name
            checked += 1
    assert checked == len(layers)
