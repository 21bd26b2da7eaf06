"""Layer algebra: forward, merge/unmerge, Conv1D layout (DESIGN §4.3)."""

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model

from pica import PiCaConfig
from tests.conftest import make_gpt2, make_llama, pica_layers, randomize_updates


def _wrapped(kind: str, **config):
    model = make_llama() if kind == "llama" else make_gpt2()
    return get_peft_model(model, PiCaConfig(rank=4, **config))


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_forward_equals_linear_with_effective_weight(kind):
    model = _wrapped(kind)
    randomize_updates(model)
    x = torch.randn(3, 5, 32)
    for name, layer in pica_layers(model).items():
        base = layer.get_base_layer()
        w0 = base.weight.T if kind == "gpt2" else base.weight  # (out, in)
        if layer.in_features != 32:
            continue
        expected = F.linear(x, w0 + layer.get_update("default") @ layer.pica_P["default"], base.bias)
        assert torch.allclose(layer(x), expected, atol=1e-5), name
        assert torch.allclose(layer.get_delta_weight("default"), layer.get_update("default") @ layer.pica_P["default"])


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_projector_is_top_right_singular_subspace_of_pytorch_layout_weight(kind):
    model = _wrapped(kind)
    for name, layer in pica_layers(model).items():
        base = layer.get_base_layer()
        w0 = (base.weight.T if kind == "gpt2" else base.weight).double()  # (out, in)
        projector = layer.pica_P["default"].double()
        assert projector.shape == (4, layer.in_features)
        top = torch.linalg.svd(w0, full_matrices=False).Vh[:4]
        assert torch.linalg.matrix_norm(projector - projector @ top.T @ top, ord=2) < 1e-4, name


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_merge_unmerge_and_idempotence(kind):
    model = _wrapped(kind)
    randomize_updates(model)
    layers = pica_layers(model)
    originals = {name: layer.get_base_layer().weight.detach().clone() for name, layer in layers.items()}
    for name, layer in layers.items():
        delta = layer.get_delta_weight("default")
        layer.merge()
        layer.merge()  # second call is a no-op (warns)
        merged = layer.get_base_layer().weight
        expected = originals[name] + (delta.T if kind == "gpt2" else delta)
        assert torch.allclose(merged, expected, atol=1e-6)
        layer.unmerge()
        assert torch.allclose(layer.get_base_layer().weight, originals[name], atol=1e-6)
        assert not layer.merged


def test_merged_forward_equals_unmerged():
    model = _wrapped("llama")
    randomize_updates(model)
    inputs = torch.randint(1, 96, (2, 6))
    with torch.no_grad():
        unmerged = model(input_ids=inputs).logits
        model.merge_adapter()
        merged = model(input_ids=inputs).logits
        model.unmerge_adapter()
    assert torch.allclose(unmerged, merged, atol=1e-5)


def test_safe_merge_refuses_non_finite_and_leaves_weight():
    model = _wrapped("llama")
    layer = next(iter(pica_layers(model).values()))
    before = layer.get_base_layer().weight.detach().clone()
    with torch.no_grad():
        layer.get_update("default")[0, 0] = float("inf")
    with pytest.raises(ValueError, match="default"):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.get_base_layer().weight, before) and not layer.merged


def test_layer_repr_and_disable():
    model = _wrapped("llama")
    randomize_updates(model)
    layer = next(iter(pica_layers(model).values()))
    assert repr(layer).startswith("pica.")
    x = torch.randn(2, 32)
    with model.disable_adapter():
        assert torch.equal(layer(x), layer.get_base_layer()(x))
    assert not torch.allclose(layer(x), layer.get_base_layer()(x))
