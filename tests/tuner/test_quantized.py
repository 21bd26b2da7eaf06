"""PiCa on bitsandbytes-quantised base layers: sizes, P from the de-quantised weight, forward, refusals."""

from __future__ import annotations

import weakref

import pytest
import torch
from peft import get_peft_model
from torch import nn

from pica import PiCaConfig, top_right_singular_vectors, weight_fingerprint
from pica.tuner import plan as plan_module
from pica.base_weights import base_weight_out_in, is_quantized
from pica.quantization_record import adapter_view
from tests.conftest import pica_layers, randomize_updates
from tests.quantized_fixtures import SCHEMES, bnb_layout, load_quantized, save_llama  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("bnb_layout")  # every test in both 4-bit layouts (tests/quantized_fixtures.py)

INPUTS = torch.randint(1, 96, (2, 7), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_llama(tmp_path_factory.mktemp("llama"))


def test_rank_4_on_a_4bit_llama_uses_the_module_sizes(llama_dir):
    """The issue's repro: rank 4 used to fail with "exceeds min(out_features, in_features) ... (2048, 1)"."""
    model = get_peft_model(load_quantized(llama_dir, "nf4"), PiCaConfig(rank=4))
    layers = pica_layers(model)
    assert len(layers) == 2 * 5  # q, k, v, up, down in 2 layers
    for name, layer in layers.items():
        base = layer.get_base_layer()
        assert is_quantized(base) and base.weight.dtype == torch.uint8, name  # still packed storage
        assert (layer.out_features, layer.in_features) == (base.out_features, base.in_features)
        assert layer.pica_P["default"].shape == (4, base.in_features)
    assert model.peft_config["default"].base_quantization == {
        "method": "bitsandbytes_4bit", "quant_type": "nf4", "blocksize": 64, "compress_statistics": False,
        "dtype": "float32", "block_scales": "bfloat16", "unquantized_modules": []}


def _largest_principal_sine(a: torch.Tensor, b: torch.Tensor) -> float:
    """sin of the largest principal angle between the row spaces of two orthonormal-row matrices:
    the spectral norm of ``a``'s rows minus their projection onto ``b``'s row space."""
    a, b = a.double(), b.double()
    return float(torch.linalg.matrix_norm(a - (a @ b.T) @ b, ord=2))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_projector_and_fingerprint_come_from_the_dequantised_weight(llama_dir, scheme):
    model = get_peft_model(load_quantized(llama_dir, scheme), PiCaConfig(rank=4))
    record = model.peft_config["default"].base_quantization
    for name, layer in pica_layers(model).items():
        base = layer.get_base_layer()
        read = adapter_view(base, record)  # (out, in) de-quantised; 4-bit: block scales rounded to bf16
        assert read.shape == (base.out_features, base.in_features) and read.is_floating_point()
        assert torch.equal(layer.pica_P["default"], top_right_singular_vectors(read, 4))
        assert torch.equal(layer.pica_fingerprint["default"], weight_fingerprint(read))
        # P spans the top-4 subspace of the weight the layer computes with, within Wedin's bound for the read's error
        exact = base_weight_out_in(base).float()
        values = torch.linalg.svdvals(exact.double())
        bound = 2 * float(torch.linalg.matrix_norm((read - exact).double(), ord=2)) / float(values[3] - values[4])
        sine = _largest_principal_sine(layer.pica_P["default"], top_right_singular_vectors(exact, 4))
        assert sine <= bound + 1e-5, (name, sine, bound)
        if scheme == "int8":  # the codes are not the weight: P of the raw int8 storage is another subspace
            codes = top_right_singular_vectors(base.weight.data.float(), 4)
            assert not torch.allclose(codes.abs(), layer.pica_P["default"].abs(), atol=1e-3), name


@pytest.mark.parametrize("scheme", SCHEMES)
def test_forward_is_base_layer_plus_pica_term_never_merged(llama_dir, scheme, monkeypatch):
    model = load_quantized(llama_dir, scheme)
    with torch.no_grad():
        expected = model(INPUTS).logits
    model = get_peft_model(model, PiCaConfig(rank=4))
    monkeypatch.setattr("pica.tuner.layer.cheaper_form", lambda *args, **kwargs: "merged")  # wherever exact
    monkeypatch.setattr("pica.tuner.layer.merged_pica_linear", lambda *a, **k: pytest.fail("merged form on a quantised base"))
    with torch.no_grad():
        assert torch.equal(model(INPUTS).logits, expected)  # M = 0: the base model, bitwise
    randomize_updates(model)
    x = torch.randn(3, 64)
    for name, layer in pica_layers(model).items():
        if layer.in_features != 64:
            continue
        update, projector = layer.get_update("default"), layer.pica_P["default"]
        assert update.dtype == torch.float32 and update.requires_grad
        with torch.no_grad():
            assert torch.allclose(layer(x), layer.get_base_layer()(x) + x @ projector.T @ update.T, atol=1e-6), name


def test_bfloat16_compute_dtype_keeps_m_in_float32_and_output_in_bfloat16(llama_dir):
    model = get_peft_model(load_quantized(llama_dir, "nf4", compute_dtype=torch.bfloat16), PiCaConfig(rank=4))
    randomize_updates(model)
    layer = pica_layers(model)["base_model.model.model.layers.0.self_attn.q_proj"]
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    output = layer(x)
    assert output.dtype == layer.get_base_layer()(x).dtype == torch.bfloat16 and torch.isfinite(output).all()
    assert layer.get_update("default").dtype == torch.float32


def test_at_most_one_dequantised_weight_per_worker_exists(llama_dir, monkeypatch):
    alive, peak = set(), [0]
    real_view = plan_module.adapter_view

    def counted(module, scheme):
        weight = real_view(module, scheme)
        key = id(weight)
        alive.add(key)
        peak[0] = max(peak[0], len(alive))
        weakref.finalize(weight, alive.discard, key)
        return weight

    monkeypatch.setattr(plan_module, "adapter_view", counted)
    monkeypatch.setattr("pica.projector_batch._default_workers", lambda shapes, rank, materialised=False: 2)
    get_peft_model(load_quantized(llama_dir, "nf4"), PiCaConfig(rank=4))
    assert 1 <= peak[0] <= 2  # 10 targets, never more than the 2 workers' weights at once


def test_merge_into_a_quantised_base_is_refused_and_changes_nothing(llama_dir):
    model = get_peft_model(load_quantized(llama_dir, "nf4"), PiCaConfig(rank=4))
    randomize_updates(model)
    with torch.no_grad():
        before = model(INPUTS).logits
    for merge in (model.merge_and_unload, model.merge_adapter, lambda: next(iter(pica_layers(model).values())).merge()):
        with pytest.raises(TypeError, match=r"does not merge into quantised base layers .*Linear4bit.*export_merged"):
            merge()
    assert not any(layer.merged for layer in pica_layers(model).values())
    with torch.no_grad():
        assert torch.equal(model(INPUTS).logits, before)


class _PackedLinear(nn.Module):
    """Stand-in for a GPTQ/AWQ-style layer: packed integer ``qweight``, no float ``weight``."""

    def __init__(self) -> None:
        super().__init__()
        self.in_features = self.out_features = 32
        self.register_buffer("qweight", torch.zeros(4, 32, dtype=torch.int32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _int8_weight_linear() -> nn.Linear:
    """Stand-in for a torchao-style layer: an ``nn.Linear`` whose weight holds int8 codes."""
    layer = nn.Linear(32, 32, bias=False)
    layer.weight = nn.Parameter(torch.zeros(32, 32, dtype=torch.int8), requires_grad=False)
    return layer


@pytest.mark.parametrize("make_layer, type_name", [(_PackedLinear, "_PackedLinear"), (_int8_weight_linear, "Linear")])
def test_other_quantised_layer_types_are_refused_naming_module_and_type(make_layer, type_name):
    from tests.conftest import make_llama

    model = make_llama()
    model.model.layers[1].self_attn.q_proj = make_layer()
    with pytest.raises(TypeError, match=rf"quantised in another way: \['model\.layers\.1\.self_attn\.q_proj "
                                        rf"\([\w.]*\.{type_name}\)'\]"):
        get_peft_model(model, PiCaConfig(rank=4))
    assert not pica_layers(model)
