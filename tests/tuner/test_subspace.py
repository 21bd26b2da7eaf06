"""``PiCaConfig(subspace="random")``: a random orthonormal P of the same rank (ablation)."""

import peft
import pytest
import torch

from pica import PiCaConfig
from pica.projector import top_right_singular_vectors
from pica.tuner.layer import base_weight_out_in
from pica.random_subspace import random_orthonormal_rows

from tests.conftest import example_inputs, make_llama, model_output, pica_layers, randomize_updates


def _projectors(model) -> dict[str, torch.Tensor]:
    return {name: layer.pica_P["default"].detach().clone() for name, layer in pica_layers(model).items()}


@pytest.mark.parametrize(("field", "value"), [("subspace", "bottom"), ("subspace_seed", -1), ("subspace_seed", 1.5),
                                              ("subspace_seed", True)])
def test_bad_subspace_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        PiCaConfig(**{field: value})


def test_random_rows_are_orthonormal_deterministic_and_depend_on_seed_and_name():
    first = random_orthonormal_rows("model.layers.0.self_attn.q_proj", 8, 32, seed=0)
    assert first.shape == (8, 32) and first.dtype == torch.float32
    torch.testing.assert_close(first @ first.T, torch.eye(8), atol=1e-6, rtol=0)
    assert torch.equal(first, random_orthonormal_rows("model.layers.0.self_attn.q_proj", 8, 32, seed=0))
    assert not torch.allclose(first, random_orthonormal_rows("model.layers.0.self_attn.q_proj", 8, 32, seed=1))
    assert not torch.allclose(first, random_orthonormal_rows("model.layers.1.self_attn.q_proj", 8, 32, seed=0))


def test_random_subspace_differs_from_top_and_keeps_identity_at_init():
    base = make_llama()
    inputs = example_inputs("llama")
    expected = model_output(base, inputs)
    model = peft.get_peft_model(base, PiCaConfig(rank=4, subspace="random", subspace_seed=3))
    assert torch.equal(model_output(model, inputs), expected)
    for name, layer in pica_layers(model).items():
        projector = layer.pica_P["default"]
        torch.testing.assert_close(projector @ projector.T, torch.eye(4), atol=1e-5, rtol=0)
        top = top_right_singular_vectors(base_weight_out_in(layer.get_base_layer()), 4)
        # principal-angle cosines between the random and the top subspaces are not all 1
        cosines = torch.linalg.svdvals(projector @ top.T)
        assert cosines.min() < 0.99, name
    # trainable parameter count is the same as the top subspace's
    top_model = peft.get_peft_model(make_llama(), PiCaConfig(rank=4))
    assert model.get_nb_trainable_parameters() == top_model.get_nb_trainable_parameters()


@pytest.mark.parametrize("storage", ["full", "compact"])
def test_random_subspace_round_trip(storage, tmp_path):
    inputs = example_inputs("llama")
    config = PiCaConfig(rank=4, subspace="random", subspace_seed=7, projector_storage=storage)
    model = peft.get_peft_model(make_llama(), config)
    randomize_updates(model)
    expected, projectors = model_output(model, inputs), _projectors(model)
    model.save_pretrained(tmp_path)
    reloaded = peft.PeftModel.from_pretrained(make_llama(), tmp_path)
    assert reloaded.peft_config["default"].subspace == "random"
    assert reloaded.peft_config["default"].subspace_seed == 7
    for name, projector in _projectors(reloaded).items():
        assert torch.equal(projector, projectors[name]), name
    torch.testing.assert_close(model_output(reloaded, inputs), expected, atol=0, rtol=0)
