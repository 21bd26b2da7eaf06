"""Loading a full adapter takes ``P`` from the file (no recomputation), validated before any layer is built."""

import pytest
import torch
from peft import PeftModel, get_peft_model

import pica.projector_sharing as plan  # where plan_adapter's projector computation is looked up
from pica import PiCaConfig
from tests.conftest import example_inputs, make_llama, model_output, pica_layers, randomize_updates


@pytest.fixture
def projector_calls(monkeypatch):
    """Count the projector computations of ``plan_adapter`` (each call computes a list of P)."""
    calls: list[int] = []
    original = plan.top_right_singular_vectors_many

    def counting(weights, *args, **kwargs):
        calls.append(len(weights))
        return original(weights, *args, **kwargs)

    monkeypatch.setattr(plan, "top_right_singular_vectors_many", counting)
    return calls


def _saved(path, **config) -> torch.Tensor:
    model = get_peft_model(make_llama(), PiCaConfig(rank=4, **config))
    randomize_updates(model, seed=2)
    model.save_pretrained(path)
    return model_output(model, example_inputs("llama"))


@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
def test_full_adapter_load_reads_p_without_computing_it(projector_calls, low_cpu_mem_usage, tmp_path):
    expected = _saved(tmp_path)
    projector_calls.clear()
    loaded = PeftModel.from_pretrained(make_llama(), tmp_path, low_cpu_mem_usage=low_cpu_mem_usage)
    assert projector_calls == []
    assert torch.equal(model_output(loaded, example_inputs("llama")), expected)
    layers = pica_layers(loaded)
    assert layers and all(torch.isfinite(layer.pica_P["default"]).all() for layer in layers.values())


def test_full_adapter_through_load_adapter_and_transformers(projector_calls, tmp_path):
    expected = _saved(tmp_path)
    projector_calls.clear()
    second = PeftModel.from_pretrained(make_llama(), tmp_path)
    second.load_adapter(tmp_path, adapter_name="again")
    second.set_adapter("again")
    assert torch.equal(model_output(second, example_inputs("llama")), expected)
    assert projector_calls == []
    # transformers' own loader keeps no tuner (where M lives): refused, pointing to PeftModel.from_pretrained
    base = make_llama()
    with pytest.raises(ValueError, match=r"PeftModel\.from_pretrained"):
        base.load_adapter(str(tmp_path))
    assert not pica_layers(base) and not hasattr(base, "peft_config")


@pytest.mark.parametrize("storage", ["compact"])
def test_adapters_without_p_still_compute_it(projector_calls, storage, tmp_path):
    expected = _saved(tmp_path, projector_storage=storage)
    projector_calls.clear()
    loaded = PeftModel.from_pretrained(make_llama(), tmp_path)
    assert projector_calls == [len(pica_layers(loaded))]
    assert torch.allclose(model_output(loaded, example_inputs("llama")), expected, atol=1e-5)


def test_non_orthonormal_p_is_refused_before_any_layer_is_built(projector_calls, tmp_path):
    from safetensors.torch import load_file, save_file

    _saved(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = next(key for key in sorted(tensors) if key.endswith(".pica_P"))
    tensors[key] = tensors[key] * 1.01  # rows of norm 1.01: finite, right shape, not a projector
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    base = make_llama()
    projector_calls.clear()
    with pytest.raises(ValueError, match="P rows are not orthonormal"):
        PeftModel.from_pretrained(base, tmp_path)
    assert not pica_layers(base) and projector_calls == []


def test_full_adapter_missing_p_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    _saved(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    dropped = next(key for key in tensors if key.endswith(".pica_P"))
    save_file({k: v for k, v in tensors.items() if k != dropped}, tmp_path / "adapter_model.safetensors")
    base = make_llama()
    with pytest.raises(ValueError, match="P missing"):
        PeftModel.from_pretrained(base, tmp_path)
    assert not pica_layers(base)


def test_get_peft_model_after_a_load_computes_again(projector_calls, tmp_path):
    _saved(tmp_path)
    PeftModel.from_pretrained(make_llama(), tmp_path)
    projector_calls.clear()
    fresh = get_peft_model(make_llama(), PiCaConfig(rank=4))
    assert projector_calls == [len(pica_layers(fresh))]
    assert all(torch.isfinite(layer.pica_P["default"]).all() for layer in pica_layers(fresh).values())
