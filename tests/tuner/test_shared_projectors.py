"""Many adapters, one ``P`` (issue 29): adapters whose projectors agree hold one storage per layer, a second
adapter computes no projector, loads keep no second copy (and never write into another adapter's ``P``),
mixed batches project once per storage."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model, set_peft_model_state_dict

from pica import PiCaConfig
from pica.shared_storage import SHARE_TOLERANCE, roots
from tests.conftest import example_inputs, make_llama, pica_layers, randomize_updates

INPUTS = example_inputs("llama")


def _storages(model) -> dict[str, int]:
    """Module name → number of distinct P storages the layer holds."""
    return {name: len(roots(layer.pica_P)) for name, layer in pica_layers(model).items()}


def _no_projector_computed(monkeypatch):
    import pica.projector_sharing as sharing  # where plan_adapter's computation is looked up

    original = sharing.top_right_singular_vectors_many

    def refuse(weights, *args, **kwargs):
        assert not weights, f"{len(weights)} projector(s) computed"
        return original(weights, *args, **kwargs)

    monkeypatch.setattr(sharing, "top_right_singular_vectors_many", refuse)


def _logits(model, adapter=None):
    if adapter is not None:
        model.set_adapter(adapter)
    with torch.no_grad():
        return model(**INPUTS).logits


def test_adapters_with_the_same_settings_hold_one_p_and_a_second_computes_none(monkeypatch):
    model = get_peft_model(make_llama(), PiCaConfig(rank=4))
    alone = {name: layer.pica_P["default"].clone() for name, layer in pica_layers(model).items()}
    _no_projector_computed(monkeypatch)
    for name in ("b", "c"):
        model.add_adapter(name, PiCaConfig(rank=4))
    model.add_adapter("narrow", PiCaConfig(rank=2, target_modules=["q_proj"]))
    assert set(_storages(model).values()) == {1}
    for name, layer in pica_layers(model).items():
        for adapter, projector in layer.pica_P.items():
            assert torch.equal(projector, alone[name][: layer.rank[adapter]]), (name, adapter)
    model.delete_adapter("default")  # the others keep the P it shared
    assert all(torch.equal(layer.pica_P["b"], alone[name]) for name, layer in pica_layers(model).items())


def test_other_settings_get_their_own_p(monkeypatch):
    model = get_peft_model(make_llama(), PiCaConfig(rank=4))
    model.add_adapter("random", PiCaConfig(rank=4, subspace="random"))
    model.add_adapter("fp64", PiCaConfig(rank=4, projector_dtype="float64"))
    counts = _storages(model)
    assert min(counts.values()) >= 2  # random is another subspace; fp64 agrees within the tolerance or not
    for layer in pica_layers(model).values():
        assert not torch.allclose(layer.pica_P["random"], layer.pica_P["default"], atol=1e-3)
        assert torch.allclose(layer.pica_P["fp64"], layer.pica_P["default"], atol=1e-4)


@pytest.mark.parametrize("storage", ["full", "compact"])
def test_loading_onto_a_model_that_holds_the_p_keeps_no_second_copy(tmp_path, monkeypatch, storage):
    trained = get_peft_model(make_llama(), PiCaConfig(rank=4, projector_storage=storage))
    randomize_updates(trained, seed=1)
    trained.save_pretrained(tmp_path)
    expected = _logits(PeftModel.from_pretrained(make_llama(), tmp_path))
    serving = get_peft_model(make_llama(), PiCaConfig(rank=4))
    _no_projector_computed(monkeypatch)
    serving.load_adapter(tmp_path, adapter_name="user1")
    serving.load_adapter(tmp_path, adapter_name="user2")
    assert set(_storages(serving).values()) == {1}
    assert torch.allclose(_logits(serving, "user1"), expected, atol=1e-6, rtol=0)
    assert torch.equal(_logits(serving, "user2"), _logits(serving, "user1"))


def test_a_file_whose_p_differs_keeps_its_own_and_changes_no_other_adapter(tmp_path):
    trained = get_peft_model(make_llama(), PiCaConfig(rank=4))
    randomize_updates(trained, seed=1)
    trained.save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("layers.0.self_attn.q_proj.pica_P"))
    rotation = torch.linalg.matrix_exp(1e-3 * (lambda a: a - a.T)(torch.randn(4, 4)))
    tensors[key] = (rotation.double() @ tensors[key].double()).float().contiguous()  # orthonormal, not the same P
    save_file(tensors, tmp_path / "adapter_model.safetensors", metadata={"format": "pt"})
    serving = get_peft_model(make_llama(), PiCaConfig(rank=4))
    before = {name: layer.pica_P["default"].clone() for name, layer in pica_layers(serving).items()}
    serving.load_adapter(tmp_path, adapter_name="user")
    for name, layer in pica_layers(serving).items():
        assert torch.equal(layer.pica_P["default"], before[name]), name
        if name.endswith("layers.0.self_attn.q_proj"):
            assert torch.equal(layer.pica_P["user"], tensors[key])  # exactly the file's
            assert len(roots(layer.pica_P)) == 2
        else:
            assert len(roots(layer.pica_P)) == 1
    assert torch.allclose(_logits(serving, "user"), _logits(PeftModel.from_pretrained(make_llama(), tmp_path)),
                          atol=1e-6, rtol=0)


def test_a_raw_state_dict_load_never_writes_into_a_shared_p():
    model = get_peft_model(make_llama(), PiCaConfig(rank=4))
    model.add_adapter("b", PiCaConfig(rank=4))
    layer = pica_layers(model)["base_model.model.model.layers.0.self_attn.q_proj"]
    before = layer.pica_P["default"].clone()
    state = {key: value.clone() for key, value in model.state_dict().items() if ".pica_P.b" in key}
    nudged = "base_model.model.model.layers.0.self_attn.q_proj.pica_P.b"
    state[nudged] = state[nudged] + 10 * SHARE_TOLERANCE
    model.load_state_dict(state, strict=False)
    assert torch.equal(layer.pica_P["default"], before)
    assert torch.equal(layer.pica_P["b"], state[nudged])
    assert len(roots(layer.pica_P)) == 2
    other = pica_layers(model)["base_model.model.model.layers.0.self_attn.k_proj"]
    assert len(roots(other.pica_P)) == 1  # values within the tolerance: still one storage


def test_a_wider_adapter_becomes_the_shared_root():
    model = get_peft_model(make_llama(), PiCaConfig(rank=2))
    narrow = _logits(model)
    model.add_adapter("wide", PiCaConfig(rank=4))
    assert set(_storages(model).values()) == {1}
    for layer in pica_layers(model).values():
        assert layer.pica_P["default"].shape[0] == 2 and layer.pica_P["wide"].shape[0] == 4
    assert torch.allclose(_logits(model, "default"), narrow, atol=1e-5, rtol=0)


def test_moves_and_saves_keep_shares_and_files_complete(tmp_path):
    model = get_peft_model(make_llama(), PiCaConfig(rank=4))
    model.add_adapter("narrow", PiCaConfig(rank=2))
    randomize_updates(model, seed=2)
    model.to(torch.float64).to(torch.float32)  # every buffer goes through _apply
    for layer in pica_layers(model).values():
        layer.pica_P._apply(torch.clone)  # a move that copies: one copy per storage, not per adapter
    assert set(_storages(model).values()) == {1}
    model.save_pretrained(tmp_path, selected_adapters=["narrow"])
    config = json.loads((tmp_path / "narrow" / "adapter_config.json").read_text())
    assert config["rank"] == 2
    alone = PeftModel.from_pretrained(make_llama(), tmp_path / "narrow")  # a file loads alone
    assert torch.allclose(_logits(alone), _logits(model, "narrow"), atol=1e-6, rtol=0)


def test_a_mixed_batch_projects_once_per_shared_p(monkeypatch):
    model = get_peft_model(make_llama(), PiCaConfig(rank=4)).eval()
    model.add_adapter("b", PiCaConfig(rank=4))
    model.add_adapter("c", PiCaConfig(rank=2))
    randomize_updates(model, seed=4)
    names = ["default", "b", "__base__", "c"]
    input_ids = torch.randint(1, 96, (4, 6), generator=torch.Generator().manual_seed(0))
    expected = []
    for row, name in zip(input_ids, names):
        if name == "__base__":
            with model.disable_adapter(), torch.no_grad():
                expected.append(model(input_ids=row[None]).logits)
        else:
            expected.append(_logits_of(model, name, row[None]))
    layer = pica_layers(model)["base_model.model.model.layers.0.self_attn.q_proj"]
    projections = []
    original = F.linear

    def counting(x, weight, bias=None):
        if any(weight is p or (weight.shape == p.shape and weight.data_ptr() == p.data_ptr())
               for p in layer.pica_P.values()):
            projections.append(tuple(weight.shape))
        return original(x, weight, bias)

    monkeypatch.setattr(F, "linear", counting)
    with torch.no_grad():
        mixed = model(input_ids=input_ids, adapter_names=names).logits
    monkeypatch.setattr(F, "linear", original)
    assert projections == [(4, layer.in_features)]  # one projection at the widest rank for three adapters
    assert torch.allclose(mixed, torch.cat(expected), atol=1e-5, rtol=0)


def _logits_of(model, name, input_ids):
    model.set_adapter(name)
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def test_set_peft_model_state_dict_of_the_same_adapter_keeps_the_share():
    model = get_peft_model(make_llama(), PiCaConfig(rank=4))
    model.add_adapter("b", PiCaConfig(rank=4))
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model, adapter_name="b")
    set_peft_model_state_dict(model, state, adapter_name="b")
    assert set(_storages(model).values()) == {1}
