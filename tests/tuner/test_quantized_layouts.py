"""Every layout bitsandbytes keeps a quantised weight in, on any host.

bitsandbytes repacks a 4-bit layer in place for its CPU kernel on CPUs with AVX512-BF16 (see
:mod:`pica.base_weights`). Here weights are packed by calling bitsandbytes's own conversion
(``bitsandbytes.functional._convert_weight_packed_for_cpu``, pure torch) so that pica's reader, the
recorded scheme, saves and loads are checked on hosts without that kernel too; the few checks that
need the packed kernel to run a forward are marked and run where bitsandbytes has it.
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel, get_peft_model

from pica import PiCaConfig
from pica.analysis.weights import linear_weights
from pica.base_weights import _differentiable_output, dequantized, guard_quantized_layers, is_cpu_packed, keep_unpacked, layer_scheme
from tests.conftest import pica_layers, randomize_updates
from tests.quantized_fixtures import HAS_PACKED_KERNEL, bnb, load_quantized, save_llama

needs_packed_kernel = pytest.mark.skipif(not HAS_PACKED_KERNEL, reason="forward of a packed layer needs "
                                         "bitsandbytes's CPU-packed kernel (AVX512-BF16); absent on this host")
STORAGES = (torch.uint8, torch.bfloat16, torch.float32)


def _pack(layer) -> None:
    """Repack one ``Linear4bit`` exactly as bitsandbytes's forward does on an AVX512-BF16 CPU."""
    weight = layer.weight
    weight.data, weight.quant_state = bnb.functional._convert_weight_packed_for_cpu(weight.data, weight.quant_state)


def _pack_model(model) -> None:
    layers = [module for module in model.modules() if isinstance(module, bnb.nn.Linear4bit)]
    assert layers
    for layer in layers:
        _pack(layer)


def _layer(quant_type: str, nested: bool, storage: torch.dtype, seed: int = 0, bias: bool = True):
    """A quantised ``Linear4bit`` (128 → 64: sizes bitsandbytes can pack) from a random float weight."""
    torch.manual_seed(seed)
    source = torch.nn.Linear(128, 64, bias=bias)
    layer = bnb.nn.Linear4bit(128, 64, bias=bias, compute_dtype=torch.float32, compress_statistics=nested,
                              quant_type=quant_type, quant_storage=storage)
    layer.weight = bnb.nn.Params4bit(source.weight.data.clone(), requires_grad=False, compress_statistics=nested,
                                     quant_type=quant_type, quant_storage=storage, module=layer)
    if bias:
        layer.bias = torch.nn.Parameter(source.bias.data.clone(), requires_grad=False)
    layer.weight._quantize("cpu")
    return layer


def _snapshot(layer) -> tuple:
    """The layer's storage (address, copy) and its quantisation state's fields (copies)."""
    data = layer.weight.data
    return data.data_ptr(), data.clone(), {key: value.clone() if isinstance(value, torch.Tensor) else value
                                           for key, value in vars(layer.weight.quant_state).items() if key != "state2"}


def _same(snapshot, layer) -> bool:
    address, data, fields = snapshot
    now = _snapshot(layer)
    return now[0] == address and torch.equal(now[1], data) and fields.keys() == now[2].keys() and all(
        torch.equal(value, now[2][key]) if isinstance(value, torch.Tensor) else value == now[2][key]
        for key, value in fields.items())


@pytest.mark.parametrize("storage", STORAGES, ids=str)
@pytest.mark.parametrize("nested", [False, True], ids=["single", "double"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_one_reader_gives_the_same_bits_in_every_layout_and_changes_nothing(quant_type, nested, storage):
    layer = _layer(quant_type, nested, storage)
    reference = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)  # (out, in) bitsandbytes' own
    assert torch.equal(dequantized(layer), reference)  # scales as stored: bitsandbytes's values exactly
    canonical = dequantized(layer, torch.bfloat16)
    scheme = layer_scheme(layer)
    _pack(layer)
    assert is_cpu_packed(layer)
    before = _snapshot(layer)
    assert torch.equal(dequantized(layer, torch.bfloat16), canonical)  # P and fingerprints: the same bits
    exact = dequantized(layer)  # what the packed kernel computes with: scales in bf16
    assert float(((exact - reference).abs() - 2**-8 * reference.abs()).max()) <= 0  # each value within 2^-8 relative
    assert 0 < float((exact - reference).norm() / reference.norm()) < 4e-3
    assert layer_scheme(layer) == scheme  # the scheme as quantised, not what packing changed
    assert scheme["compress_statistics"] is nested and scheme["dtype"] == "float32"
    assert _same(before, layer)  # reading changed neither the storage nor the state


@pytest.mark.parametrize("nested", [False, True], ids=["single", "double"])
def test_state_dict_leaves_a_packed_layer_packed_and_unchanged(nested):
    layer = _layer("nf4", nested, torch.uint8)
    guard_quantized_layers(layer)
    guard_quantized_layers(layer)  # idempotent: one set of hooks
    assert len(layer._state_dict_pre_hooks) == len(layer._forward_hooks) == 1
    _pack(layer)
    before, values = _snapshot(layer), dequantized(layer)
    saved = layer.state_dict()
    assert saved["weight"].shape != layer.weight.shape  # bitsandbytes saved its un-packed copy
    assert _same(before, layer) and torch.equal(dequantized(layer), values)
    bare = _layer("nf4", nested, torch.uint8)  # without the hooks bitsandbytes un-packs the live layer (lossily)
    _pack(bare)
    bare.state_dict()
    assert not is_cpu_packed(bare)


@needs_packed_kernel
@pytest.mark.parametrize("nested", [False, True], ids=["single", "double"])
def test_a_served_layer_answers_the_same_after_a_state_dict(nested):
    layer = _layer("nf4", nested, torch.uint8).eval()
    guard_quantized_layers(layer)
    x = torch.randn(5, 128)
    with torch.no_grad():
        first = layer(x)  # packs
        assert is_cpu_packed(layer)
        layer.state_dict()
        assert torch.equal(layer(x), first)


@pytest.mark.parametrize("nested", [False, True], ids=["single", "double"])
def test_gradient_through_a_packed_layer_is_the_dequantised_product(nested):
    layer = _layer("nf4", nested, torch.uint8).train()
    _pack(layer)
    x = torch.randn(5, 128, requires_grad=True)
    output = _differentiable_output(layer, (x,), None)  # the guard's forward hook (the kernel's output is replaced)
    weight = dequantized(layer)  # (out, in)
    assert torch.allclose(output, x @ weight.T + layer.bias, atol=1e-5)
    output.square().sum().backward()
    expected = (2 * (x @ weight.T + layer.bias)).detach() @ weight
    assert x.grad is not None and torch.allclose(x.grad, expected, atol=1e-4)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_llama(tmp_path_factory.mktemp("llama"))


def _projectors(model) -> dict[str, torch.Tensor]:
    return {name.removeprefix("base_model.model."): layer.pica_P["default"] for name, layer in pica_layers(model).items()}


@pytest.mark.parametrize("double_quant", [False, True], ids=["single", "double"])
@pytest.mark.parametrize("storage", ["full", "compact"])
def test_adapters_move_between_packed_and_unpacked_bases_with_the_same_p(llama_dir, tmp_path, storage, double_quant):
    fresh = load_quantized(llama_dir, "nf4", layout="unpacked", bnb_4bit_use_double_quant=double_quant)
    packed = load_quantized(llama_dir, "nf4", layout="unpacked", bnb_4bit_use_double_quant=double_quant)
    _pack_model(packed)  # as an answered request packs it on an AVX512-BF16 CPU
    on_fresh = get_peft_model(fresh, PiCaConfig(rank=4, projector_storage=storage))
    on_packed = get_peft_model(packed, PiCaConfig(rank=4, projector_storage=storage))
    assert on_fresh.peft_config["default"].base_quantization == on_packed.peft_config["default"].base_quantization
    assert on_packed.peft_config["default"].base_quantization["compress_statistics"] is double_quant
    reference = _projectors(on_fresh)
    assert all(torch.equal(p, reference[name]) for name, p in _projectors(on_packed).items())  # bitwise
    randomize_updates(on_packed)
    on_packed.save_pretrained(tmp_path / "from-packed")
    assert all(is_cpu_packed(m) for m in packed.modules() if isinstance(m, bnb.nn.Linear4bit))  # the save kept it
    randomize_updates(on_fresh, seed=1)
    on_fresh.save_pretrained(tmp_path / "from-fresh")
    # a packed (served) base takes a second user's adapter; a fresh base takes the packed one's
    on_packed.load_adapter(tmp_path / "from-fresh", adapter_name="other")
    loaded = PeftModel.from_pretrained(load_quantized(llama_dir, "nf4", layout="unpacked",
                                                      bnb_4bit_use_double_quant=double_quant), tmp_path / "from-packed")
    for name, layer in pica_layers(loaded).items():
        assert torch.equal(layer.pica_P["default"], reference[name.removeprefix("base_model.model.")])
        assert torch.equal(layer.get_update("default"), pica_layers(on_packed)[name].get_update("default"))
    assert all(torch.equal(layer.pica_P["other"], reference[name.removeprefix("base_model.model.")])
               for name, layer in pica_layers(on_packed).items())


def test_adapters_of_pica_0_1_without_block_scales_keep_loading(llama_dir, tmp_path):
    model = get_peft_model(load_quantized(llama_dir, "nf4", layout="unpacked"), PiCaConfig(rank=4))
    randomize_updates(model)
    model.save_pretrained(tmp_path / "adapter")
    config_path = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    del config["base_quantization"]["block_scales"]  # as pica 0.1 wrote it
    config_path.write_text(json.dumps(config))
    for pack in (False, True):
        base = load_quantized(llama_dir, "nf4", layout="unpacked")
        if pack:
            _pack_model(base)
        loaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
        assert "block_scales" not in loaded.peft_config["default"].base_quantization
        assert all(torch.equal(layer.pica_P["default"], pica_layers(model)[name].pica_P["default"])
                   for name, layer in pica_layers(loaded).items())


def test_an_8bit_layer_reads_the_same_before_and_after_it_has_answered(llama_dir):
    from transformers import AutoModelForCausalLM

    from tests.quantized_fixtures import quantization_config

    served = load_quantized(llama_dir, "int8", layout="unpacked")  # answered one request: scales moved to its state
    layer = served.model.layers[0].self_attn.q_proj
    assert layer.weight.SCB is None and layer.state.SCB is not None
    unserved = AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=quantization_config("int8"),
                                                    device_map="cpu")
    fresh_layer = unserved.model.layers[0].self_attn.q_proj
    assert fresh_layer.weight.SCB is not None and fresh_layer.state.SCB is None
    assert torch.equal(dequantized(layer), dequantized(fresh_layer))
    assert fresh_layer.state.SCB is None  # reading moved nothing (peft's dequantize_bnb_weight would set it)


def test_spectral_analysis_reads_values_not_codes(llama_dir):
    model = load_quantized(llama_dir, "nf4", layout="unpacked")
    _pack_model(model)
    weights = linear_weights(model)
    layer = model.model.layers[0].self_attn.q_proj
    read = weights["model.layers.0.self_attn.q_proj"]
    assert read.shape == (layer.out_features, layer.in_features) and read.is_floating_point()
    assert torch.equal(read, dequantized(layer))


def test_recipe_models_never_switch_to_the_kernel_without_gradients(llama_dir):
    model = load_quantized(llama_dir, "nf4", layout="packed" if HAS_PACKED_KERNEL else "unpacked")
    assert keep_unpacked(model) == 2 * 7  # q, k, v, o, gate, up, down in 2 layers
    assert not any(m.support_avx512bf16_for_cpu for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))


@needs_packed_kernel
def test_training_on_a_served_base_gets_the_gradient_of_an_unpacked_one(llama_dir):
    gradients = {}
    for layout in ("unpacked", "packed"):
        model = get_peft_model(load_quantized(llama_dir, "nf4", layout=layout), PiCaConfig(rank=4))
        randomize_updates(model)
        model.train()
        inputs = torch.randint(1, 96, (2, 9), generator=torch.Generator().manual_seed(0))
        model(input_ids=inputs, labels=inputs).loss.backward()
        gradients[layout] = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    for name, grad in gradients["unpacked"].items():  # the packed kernel rounds activations to bf16 in eval only
        other = gradients["packed"][name]
        assert float((other - grad).norm() / grad.norm()) < 2e-2, name
