"""Compact projector storage: sketch per layer, recompute + align at load, refusal when it misses."""

import json

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from pica import PiCaConfig, top_right_singular_vectors
from pica.sketch import SKETCH_SIZE, SKETCH_TOLERANCE, align_to_sketch, projector_sketch
from tests.conftest import example_inputs, make_gpt2, make_llama, model_output, pica_layers, randomize_updates

FACTORIES = {"llama": make_llama, "gpt2": make_gpt2}


def _saved(kind, path, storage):
    model = get_peft_model(FACTORIES[kind](), PiCaConfig(rank=4, projector_storage=storage))
    randomize_updates(model, seed=3)
    model.save_pretrained(path)
    return model, model_output(model, example_inputs(kind))


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_compact_round_trip_reproduces_logits_without_storing_p(kind, tmp_path):
    model, expected = _saved(kind, tmp_path, "compact")
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert not any(key.endswith(".pica_P") for key in tensors)
    sketches = [key for key in tensors if key.endswith(".pica_sketch")]
    assert len(sketches) == len(pica_layers(model))
    assert all(tensors[key].shape == (4, SKETCH_SIZE) for key in sketches)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["projector_storage"] == "compact"
    loaded = PeftModel.from_pretrained(FACTORIES[kind](), tmp_path)
    assert torch.allclose(model_output(loaded, example_inputs(kind)), expected, atol=1e-5)
    assert not any("sketch" in key for key in loaded.state_dict())


def test_compact_load_with_low_cpu_mem_usage_computes_p(tmp_path):
    _, expected = _saved("llama", tmp_path, "compact")
    loaded = PeftModel.from_pretrained(make_llama(), tmp_path, low_cpu_mem_usage=True)
    assert not any(layer.pica_P["default"].is_meta for layer in pica_layers(loaded).values())
    assert torch.allclose(model_output(loaded, example_inputs("llama")), expected, atol=1e-5)


def test_compact_refuses_a_base_whose_projector_differs(tmp_path):
    _saved("llama", tmp_path, "compact")
    base = make_llama()
    with torch.no_grad():  # same fingerprint class (tiny change) but a different top subspace
        for name, parameter in base.named_parameters():
            if name.endswith("q_proj.weight"):
                parameter.add_(torch.randn_like(parameter) * 0.01 * parameter.norm() / parameter.numel() ** 0.5)
    with pytest.raises(ValueError, match="misses the saved sketch"):
        PeftModel.from_pretrained(base, tmp_path)
    with pytest.raises(ValueError, match="different base"):
        PeftModel.from_pretrained(make_llama(seed=7), tmp_path)


def test_sizes_full_compact(tmp_path):
    sizes = {}
    for storage in ("full", "compact"):
        _saved("llama", tmp_path / storage, storage)
        sizes[storage] = (tmp_path / storage / "adapter_model.safetensors").stat().st_size
    assert sizes["compact"] < sizes["full"]


def _matrix_with_spectrum(spectrum, out_features, in_features, seed):
    generator = torch.Generator().manual_seed(seed)
    left = torch.linalg.qr(torch.randn(out_features, len(spectrum), generator=generator, dtype=torch.float64)).Q
    right = torch.linalg.qr(torch.randn(in_features, len(spectrum), generator=generator, dtype=torch.float64)).Q
    return (left * spectrum) @ right.T  # (out, in)


def test_alignment_undoes_sign_flips_and_rotations_inside_equal_singular_values():
    spectrum = torch.tensor([5.0, 4.0, 3.0, 3.0, 3.0, 2.0, 1.5, 1.0, 0.5, 0.25], dtype=torch.float64)  # σ_3 = σ_4 = σ_5
    weight = _matrix_with_spectrum(spectrum, 40, 64, seed=0)
    saved = top_right_singular_vectors(weight, 8, torch.float64)
    rotation = torch.eye(8, dtype=torch.float64)
    angle = torch.tensor(0.7, dtype=torch.float64)
    block = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)).Q
    rotation[2:5, 2:5] = block  # any rotation of the repeated triple is an equally valid P
    rotation[0, 0], rotation[6, 6] = -1.0, -1.0  # sign flips
    recomputed = rotation @ saved
    assert (recomputed - saved).abs().max() > 0.1 and float(angle) > 0
    aligned, residual = align_to_sketch(recomputed, weight, projector_sketch(saved))
    assert residual < 1e-6
    assert torch.allclose(aligned, saved, atol=1e-6)
    assert torch.allclose(aligned @ aligned.T, torch.eye(8, dtype=torch.float64), atol=1e-10)


def test_alignment_does_not_rotate_across_distinct_singular_values_and_reports_the_miss():
    spectrum = torch.linspace(4, 1, 10, dtype=torch.float64)
    weight = _matrix_with_spectrum(spectrum, 40, 64, seed=2)
    saved = top_right_singular_vectors(weight, 6, torch.float64)
    swapped = saved[[1, 0, 2, 3, 4, 5]]  # not a symmetry of W: must not be "aligned" away
    _, residual = align_to_sketch(swapped, weight, projector_sketch(saved))
    assert residual > 100 * SKETCH_TOLERANCE
    _, residual = align_to_sketch(saved, weight, projector_sketch(saved)[:, :5][:3])
    assert residual == float("inf")  # wrong sketch shape


def test_config_storage_modes_and_backward_compatibility(tmp_path):
    assert PiCaConfig().projector_storage == "full"
    assert "store_projector" not in PiCaConfig().to_dict()  # one field is written: projector_storage
    for storage, old in (("full", True), ("compact", False)):  # pica 0.1.0 wrote both fields
        config = PiCaConfig(rank=2, projector_storage=storage)
        config.save_pretrained(tmp_path / storage)
        path = tmp_path / storage / "adapter_config.json"
        values = json.loads(path.read_text())
        path.write_text(json.dumps({**values, "store_projector": old}))
        for loader in (PiCaConfig, PeftConfig):
            assert loader.from_pretrained(tmp_path / storage).projector_storage == storage
    with pytest.raises(ValueError, match="contradicts"):
        PiCaConfig(store_projector=False, projector_storage="full")
    with pytest.raises(ValueError, match="projector_storage"):
        PiCaConfig(projector_storage="tiny")
    with pytest.raises(ValueError, match="forward_mode"):
        PiCaConfig(forward_mode="fast")
