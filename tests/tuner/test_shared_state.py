"""Where M lives: once per group on the tuner, one tensor through every route that replaces parameters."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel, get_peft_model, inject_adapter_in_model
from peft.tuners.tuners_utils import cast_adapter_dtype

from pica import PiCaConfig
from tests.conftest import example_inputs, make_bert_classifier, make_llama, model_output, pica_layers, randomize_updates


def _registered_updates(model) -> dict[str, torch.nn.Parameter]:
    return {name: parameter for name, parameter in model.named_parameters() if ".pica_M." in name}


def _assert_one_tensor_per_group(model, groups: int) -> None:
    registered = _registered_updates(model)
    assert len(registered) == groups
    assert all(name.startswith("base_model.pica_M.default.") for name in registered)
    ids = {id(parameter) for parameter in registered.values()}
    used = {id(layer.get_update("default")) for layer in pica_layers(model).values()}
    assert used == ids  # every layer uses a registered M, and each registered M is used


@pytest.mark.parametrize("route", ["to_float64", "deepcopy", "cast_adapter_dtype", "load_state_dict_assign"])
def test_m_stays_one_registered_tensor_per_group(route):
    model = get_peft_model(make_llama(), PiCaConfig(rank=4))
    randomize_updates(model, seed=4)
    if route == "to_float64":
        model = model.to(torch.float64)
    elif route == "deepcopy":
        model = copy.deepcopy(model)
    elif route == "cast_adapter_dtype":  # peft >= 0.21.1 re-assigns the parameters of layers it casts
        model = model.to(torch.bfloat16)
        cast_adapter_dtype(model, adapter_name="default", autocast_adapter_dtype=True)
    else:
        state = {key: value.clone() for key, value in model.state_dict().items()}
        model.load_state_dict(state, assign=True)
    _assert_one_tensor_per_group(model, groups=5)
    loss = model(**example_inputs("llama"), labels=example_inputs("llama")["input_ids"]).loss
    loss.backward()
    assert all(parameter.grad is not None for parameter in _registered_updates(model).values())


def test_m_is_on_the_tuner_not_on_any_layer_and_named_after_its_group():
    model = get_peft_model(make_llama(), PiCaConfig(rank=4))
    for layer in pica_layers(model).values():
        assert not any(".pica_M" in name for name, _ in layer.named_parameters())
        assert not list(layer.parameters(recurse=False))
    assert sorted(model.base_model.pica_M["default"]) == sorted(
        f"model/layers/*/{role}" for role in ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj",
                                              "mlp/up_proj", "mlp/down_proj"))
    unshared = get_peft_model(make_llama(), PiCaConfig(rank=4, share_across_layers=False))
    assert "model/layers/1/mlp/down_proj" in unshared.base_model.pica_M["default"]


def test_second_adapter_has_its_own_m_and_trainability_follows_the_active_adapter(tmp_path):
    model = get_peft_model(make_bert_classifier(), PiCaConfig(rank=2, modules_to_save=["classifier"]))
    model.add_adapter("other", PiCaConfig(rank=3, target_modules=["query"]))
    assert set(model.base_model.pica_M) == {"default", "other"}
    assert all(p.requires_grad for p in model.base_model.pica_M["default"].values())
    assert not any(p.requires_grad for p in model.base_model.pica_M["other"].values())
    model.set_adapter("other")
    assert not any(p.requires_grad for p in model.base_model.pica_M["default"].values())
    assert all(p.requires_grad for p in model.base_model.pica_M["other"].values())
    model.base_model.set_adapter("other", inference_mode=True)
    assert not any(p.requires_grad for p in model.base_model.pica_M["other"].values())
    model.save_pretrained(tmp_path, selected_adapters=["other"])
    loaded = PeftModel.from_pretrained(make_bert_classifier(), tmp_path / "other", is_trainable=True)
    assert all(p.requires_grad for p in loaded.base_model.pica_M["default"].values())


def test_peft_inject_adapter_in_model_refuses_pica():
    base = make_llama()
    reference = model_output(base, example_inputs("llama"))
    with pytest.raises(ValueError, match="shared state"):
        inject_adapter_in_model(PiCaConfig(rank=4), base)
    assert not pica_layers(base) and torch.equal(model_output(base, example_inputs("llama")), reference)


class _SequentialMlpBlock(torch.nn.Module):
    """A block whose MLP is an ``nn.Sequential``: ``ff.0`` and ``ff.2`` are two roles of equal shape."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = torch.nn.Linear(16, 16)
        self.ff = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.GELU(), torch.nn.Linear(16, 16))

    def forward(self, x):
        return x + self.ff(self.attn(x))


def test_positions_in_a_sequential_get_their_own_m_and_layers_share():
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[_SequentialMlpBlock() for _ in range(3)])
    peft_model = get_peft_model(model, PiCaConfig(rank=4, target_modules=r".*\.(attn|ff\.0|ff\.2)"))
    groups = {layer.pica_group["default"] for layer in pica_layers(peft_model).values()}
    assert groups == {"*/attn", "*/ff/0", "*/ff/2"}


def test_adapters_of_pica_0_1_with_positions_wildcarded_load_where_one_role_and_are_refused_where_merged(tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    from pica.io import AdapterFileError

    def blocks():
        torch.manual_seed(0)
        return torch.nn.Sequential(*[_SequentialMlpBlock() for _ in range(3)])

    for targets, refused in ((r".*\.(attn|ff\.0)", False), (r".*\.(attn|ff\.0|ff\.2)", True)):
        model = get_peft_model(blocks(), PiCaConfig(rank=4, target_modules=targets))
        randomize_updates(model)
        directory = tmp_path / targets.replace("|", "_").replace("\\", "").replace("*", "")
        model.save_pretrained(directory)
        tensors = load_file(directory / "adapter_model.safetensors")
        old = {}
        for key, value in tensors.items():  # pica 0.1 wrote M keys with every number wildcarded
            old_key = key.replace("ff/0", "ff/*").replace("ff/2", "ff/*")
            if old_key in old:  # the two roles had one M then
                continue
            old[old_key] = value
        save_file(old, directory / "adapter_model.safetensors", metadata={"format": "pt"})
        if refused:
            with pytest.raises(AdapterFileError, match=r"M '\*/ff/\*' was trained as one M shared by \['\*/ff/0', "
                                                       r"'\*/ff/2'\]: pica 0.1 merged positions"):
                PeftModel.from_pretrained(blocks(), directory)
        else:
            loaded = PeftModel.from_pretrained(blocks(), directory)
            x = torch.randn(2, 16)
            with torch.no_grad():
                assert torch.equal(loaded(x), model(x))
