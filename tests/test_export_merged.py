"""Merged export (a plain transformers checkpoint), serving-limit warnings, atomic export writes."""

import logging

import pytest
import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import pica.export
from pica import PiCaConfig, export_lora, export_merged
from pica.export import serving_limits
from tests.conftest import MODEL_FACTORIES, example_inputs, make_tokenizer, model_output, randomize_updates

AUTO = {"llama": AutoModelForCausalLM, "gpt2": AutoModelForCausalLM, "bert": AutoModelForSequenceClassification}


def _trained(kind, share=True, seed=0):
    head = ["classifier"] if kind == "bert" else None
    model = get_peft_model(MODEL_FACTORIES[kind](), PiCaConfig(rank=4, share_across_layers=share, modules_to_save=head))
    randomize_updates(model, seed=seed)
    if head:
        with torch.no_grad():
            model.base_model.model.classifier.modules_to_save["default"].weight.normal_()
    return model


def _snapshot(model):
    return {key: value.detach().clone() for key, value in model.state_dict().items()}, \
        [type(module) for module in model.modules()]


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("share", [True, False])
def test_merged_checkpoint_loads_with_auto_class_and_reproduces_logits(kind, share, tmp_path):
    model = _trained(kind, share)
    expected = model_output(model, example_inputs(kind))
    state_before, types_before = _snapshot(model)
    export_merged(model, tmp_path / "merged")
    plain = AUTO[kind].from_pretrained(tmp_path / "merged").eval()
    assert not any("pica" in key or "base_layer" in key for key in plain.state_dict())
    assert (model_output(plain, example_inputs(kind)) - expected).abs().max() <= 1e-5
    # the live model is untouched: same tensors bitwise, same module types, not merged
    state_after, types_after = _snapshot(model)
    assert types_after == types_before
    assert state_after.keys() == state_before.keys()
    assert all(torch.equal(state_after[key], state_before[key]) for key in state_before)
    assert not any(getattr(module, "merged", False) for module in model.modules())


def test_merged_weights_equal_w0_plus_m_p(tmp_path):
    model = _trained("llama")
    export_merged(model, tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    layer = model.base_model.model.model.layers[1].self_attn.v_proj
    expected = layer.base_layer.weight + layer.get_update("default") @ layer.pica_P["default"]
    torch.testing.assert_close(plain.model.layers[1].self_attn.v_proj.weight, expected, rtol=0, atol=1e-6)


def test_merged_export_of_a_named_adapter_among_two(tmp_path):
    model = get_peft_model(MODEL_FACTORIES["llama"](), PiCaConfig(rank=4))
    model.add_adapter("other", PiCaConfig(rank=2, target_modules=["q_proj"]))
    randomize_updates(model)
    model.set_adapter("other")
    expected_other = model_output(model, example_inputs("llama"))
    model.set_adapter("default")
    expected_default = model_output(model, example_inputs("llama"))
    assert not torch.allclose(expected_other, expected_default)
    export_merged(model, tmp_path / "other", adapter_name="other")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "other")
    assert (model_output(plain, example_inputs("llama")) - expected_other).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="no PiCa adapter named 'missing'"):
        export_merged(model, tmp_path / "x", adapter_name="missing")
    assert not (tmp_path / "x").exists()


def test_merged_export_saves_the_given_or_local_tokenizer(tmp_path):
    tokenizer = make_tokenizer()
    base_dir = tmp_path / "base"
    MODEL_FACTORIES["llama"]().save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), PiCaConfig(rank=4))
    assert model.peft_config["default"].base_model_name_or_path == str(base_dir)
    export_merged(model, tmp_path / "found")  # tokenizer found next to the base model
    export_merged(model, tmp_path / "given", tokenizer=tokenizer)
    for name in ("found", "given"):
        loaded = AutoTokenizer.from_pretrained(tmp_path / name)
        assert loaded("the cat is big")["input_ids"] == tokenizer("the cat is big")["input_ids"]
    export_merged(get_peft_model(MODEL_FACTORIES["llama"](), PiCaConfig(rank=4)), tmp_path / "none")
    assert not (tmp_path / "none" / "tokenizer_config.json").exists()


def test_failed_export_leaves_the_previous_export_whole(tmp_path, monkeypatch):
    model = _trained("llama")
    export_lora(model, tmp_path / "lora")
    export_merged(model, tmp_path / "merged")
    before = {path.name: path.read_bytes() for directory in ("lora", "merged") for path in (tmp_path / directory).iterdir()}

    def fail(*args, **kwargs):
        raise OSError("disk full (injected)")

    randomize_updates(model, seed=1)
    monkeypatch.setattr(pica.export, "save_file", fail)
    with pytest.raises(OSError, match="injected"):
        export_lora(model, tmp_path / "lora", overwrite=True)
    monkeypatch.setattr(type(model.get_base_model()), "save_pretrained", fail)
    with pytest.raises(OSError, match="injected"):
        export_merged(model, tmp_path / "merged", overwrite=True)
    after = {path.name: path.read_bytes() for directory in ("lora", "merged") for path in (tmp_path / directory).iterdir()}
    assert after == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["lora", "merged"]  # no staging left behind


def test_export_refuses_existing_dir_and_non_directory(tmp_path):
    model = _trained("llama")
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "keep.txt").write_text("x")  # an empty directory would be used as it is
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_merged(model, tmp_path / "merged")
    assert (tmp_path / "merged" / "keep.txt").read_text() == "x"
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="not a directory"):
        export_merged(model, tmp_path / "file", overwrite=True)
    assert (tmp_path / "file").read_text() == "x"


@pytest.mark.parametrize(
    ("rank", "modules_to_save", "expected"),
    [
        (16, None, []),
        (17, None, ["--max-lora-rank 32"]),
        (256, None, ["--max-lora-rank 256"]),
        (300, None, ["--max-lora-rank 320"]),
        (600, None, ["above vLLM's largest --max-lora-rank (512)"]),
        (8, ["classifier"], ["modules_to_save ['classifier']"]),
    ],
)
def test_serving_limits(rank, modules_to_save, expected):
    problems = serving_limits(rank, modules_to_save)
    assert len(problems) == len(expected)
    for problem, fragment in zip(problems, expected):
        assert fragment in problem


def test_export_lora_logs_serving_limits(tmp_path, caplog):
    model = get_peft_model(MODEL_FACTORIES["bert"](), PiCaConfig(rank=20, modules_to_save=["classifier"]))
    with caplog.at_level(logging.WARNING, logger="pica.export"):
        export_lora(model, tmp_path / "lora")
    messages = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert any("--max-lora-rank 32" in message for message in messages)
    assert any("modules_to_save" in message for message in messages)
