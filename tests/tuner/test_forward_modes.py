"""Forward forms of the PiCa layer: the merged product that ``forward_mode="auto"`` uses gives the same
outputs and gradients as the factored form, runs only where it is exact, gradient checkpointing works.
``forced`` makes ``auto`` pick the merged product whenever it is exact, whatever the FLOP count (the
``"merged"`` mode of pica ≤ 0.2)."""

import pytest
import torch
from peft import get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from pica import PiCaConfig
from pica.tuner.layer import merged_form_applies
from tests.conftest import example_inputs, make_gpt2, make_llama, pica_layers, randomize_updates

FACTORIES = {"llama": make_llama, "gpt2": make_gpt2}


@pytest.fixture
def forced(monkeypatch):
    """``auto`` takes the merged product wherever it is exact (the FLOP rule answers "merged")."""
    monkeypatch.setattr("pica.tuner.layer.cheaper_form", lambda *args, **kwargs: "merged")


def _merged(layer, x, name="default"):
    return merged_form_applies(x, layer.get_base_layer(), layer.get_update(name), layer.pica_P[name])


def _model(kind, mode, seed=3):
    model = get_peft_model(FACTORIES[kind](), PiCaConfig(rank=4, forward_mode=mode))
    randomize_updates(model, seed=seed)
    return model


def _loss_and_grads(model, kind):
    model.zero_grad()
    loss = model(**example_inputs(kind)).logits.pow(2).mean()
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("force", [True, False])
def test_every_form_matches_factored_outputs_and_m_gradients(kind, force, monkeypatch):
    reference_loss, reference_grads = _loss_and_grads(_model(kind, "factored"), kind)
    if force:
        monkeypatch.setattr("pica.tuner.layer.cheaper_form", lambda *args, **kwargs: "merged")
    model = _model(kind, "auto")
    layers = pica_layers(model)
    assert all(layer.pica_forward_mode == "auto" for layer in layers.values())
    x = torch.randn(2, 7, next(iter(layers.values())).in_features)
    if force:
        assert all(_merged(layer, x) for layer in layers.values())
    loss, grads = _loss_and_grads(model, kind)
    assert torch.allclose(loss, reference_loss, rtol=1e-5)
    assert grads.keys() == reference_grads.keys()
    for name, grad in grads.items():
        assert torch.allclose(grad, reference_grads[name], atol=1e-6, rtol=1e-4), name


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_identity_at_init_is_bitwise_in_the_merged_form(kind, forced):
    base = FACTORIES[kind]()
    with torch.no_grad():
        expected = base(**example_inputs(kind)).logits
    model = get_peft_model(base, PiCaConfig(rank=4))
    with torch.no_grad():
        assert torch.equal(model(**example_inputs(kind)).logits, expected)


class _SubclassedLinear(nn.Linear):
    """Stands for a quantised/patched layer type: PiCa must go through its forward."""

    def forward(self, x):
        return super().forward(x) * 2


def _single_layer(base_layer, mode="auto"):
    model = nn.Sequential()
    model.add_module("proj", base_layer)
    wrapped = get_peft_model(model, PiCaConfig(rank=3, target_modules=["proj"], forward_mode=mode))
    randomize_updates(wrapped, seed=1)
    return wrapped, wrapped.base_model.model.proj


def test_merged_form_is_not_used_for_non_plain_or_hooked_base_layers(forced):
    torch.manual_seed(0)
    x = torch.randn(4, 12)
    wrapped, layer = _single_layer(_SubclassedLinear(12, 8))
    assert not _merged(layer, x)
    base = layer.get_base_layer()
    expected = 2 * (x @ base.weight.T + base.bias)
    delta = (x @ layer.pica_P["default"].T) @ layer.get_update("default").T
    assert torch.allclose(wrapped(x), expected + delta, atol=1e-6)

    wrapped, layer = _single_layer(nn.Linear(12, 8))
    assert _merged(layer, x)
    calls = []
    handle = layer.get_base_layer().register_forward_hook(lambda module, args, out: calls.append(1))
    assert not _merged(layer, x)
    wrapped(x)
    assert calls == [1]  # the hook ran: the base layer was called
    handle.remove()
    assert _merged(layer, x)


def test_merged_form_is_not_used_on_a_bf16_base_or_under_autocast(forced):
    torch.manual_seed(0)
    wrapped, layer = _single_layer(nn.Linear(12, 8).to(torch.bfloat16))
    x = torch.randn(4, 12).to(torch.bfloat16)
    assert not _merged(layer, x)  # M, P stay fp32: W0 + M P in bf16 would lose M P
    wrapped, layer = _single_layer(nn.Linear(12, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not _merged(layer, torch.randn(4, 12))


def test_auto_picks_by_token_count():
    torch.manual_seed(0)
    _, layer = _single_layer(nn.Linear(64, 64), mode="auto")  # rank 3
    few, many = torch.randn(1, 64, requires_grad=True), torch.randn(512, 64, requires_grad=True)
    assert not _merged(layer, few)
    assert _merged(layer, many)


def test_conv1d_merged_form_matches_reference(forced):
    torch.manual_seed(0)
    wrapped, layer = _single_layer(Conv1D(8, 12))
    x = torch.randn(5, 12, requires_grad=True)
    assert _merged(layer, x)
    out = wrapped(x)
    base = layer.get_base_layer()
    reference = x @ base.weight + base.bias + (x @ layer.pica_P["default"].T) @ layer.get_update("default").T
    assert torch.allclose(out, reference, atol=1e-6)


@pytest.mark.parametrize("mode", ["auto", "factored"])
@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(mode, reentrant, forced):
    plain = _model("llama", mode)
    plain.train()
    _, expected = _loss_and_grads(plain, "llama")
    checkpointed = _model("llama", mode)
    checkpointed.train()
    checkpointed.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    checkpointed.base_model.model.enable_input_require_grads()
    _, grads = _loss_and_grads(checkpointed, "llama")
    assert grads.keys() == expected.keys()
    for name, grad in grads.items():
        assert torch.allclose(grad, expected[name], atol=1e-6, rtol=1e-4), name


def _layer_model(mode: str) -> nn.Module:
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16)),
                           PiCaConfig(rank=4, target_modules=["0", "2"], forward_mode=mode))
    randomize_updates(model, seed=1)
    return model


def _m(model) -> dict[str, torch.Tensor]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def test_double_backward_through_a_merged_form_names_the_option():
    """Issue: a Hessian-vector product under the default ``auto`` was 0.69 off (the op saved ``x Pᵀ`` as a constant)."""
    model = _layer_model("auto")
    x = torch.randn(64, 16)  # 64 tokens: ``auto`` picks the merged form
    assert all(_merged(layer, x) for layer in pica_layers(model).values())
    params = list(_m(model).values())
    grads = torch.autograd.grad(model(x).pow(2).sum(), params, create_graph=False)  # first order: fine
    assert all(torch.isfinite(g).all() for g in grads)
    with pytest.raises(RuntimeError, match=r"PiCa's merged forward form .*forward_mode='factored'"):
        torch.autograd.grad(model(x).pow(2).sum(), params, create_graph=True)


def test_hessian_vector_product_in_the_factored_form_matches_finite_differences():
    model = _layer_model("factored").double()
    x = torch.randn(64, 16, dtype=torch.float64)
    params = list(_m(model).values())
    direction = [torch.randn_like(p) for p in params]
    grads = torch.autograd.grad(model(x).pow(2).sum(), params, create_graph=True)
    hvp = torch.autograd.grad(sum((g * d).sum() for g, d in zip(grads, direction)), params)
    step = 1e-6

    def gradient_at(sign: float) -> list[torch.Tensor]:
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.add_(sign * step * d)
        result = torch.autograd.grad(model(x).pow(2).sum(), params)
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.sub_(sign * step * d)
        return result

    finite = [(a - b) / (2 * step) for a, b in zip(gradient_at(1.0), gradient_at(-1.0))]
    for exact, approx in zip(hvp, finite):
        assert torch.allclose(exact, approx, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("force", [False, True])
def test_torch_func_and_forward_ad_use_the_factored_form_and_agree_with_it(force, monkeypatch):
    from torch.autograd import forward_ad
    from torch.func import functional_call, grad, jvp, vmap

    if force:
        monkeypatch.setattr("pica.tuner.layer.cheaper_form", lambda *args, **kwargs: "merged")
    reference, model = _layer_model("factored"), _layer_model("auto")
    x = torch.randn(64, 16)
    params = {name: p.detach() for name, p in _m(model).items()}
    tangent = {name: torch.randn_like(p) for name, p in params.items()}

    def loss(module):
        return lambda p, inputs: functional_call(module, p, (inputs,)).pow(2).sum()

    expected = grad(loss(reference))(params, x)
    assert all(torch.allclose(grad(loss(model))(params, x)[k], v, atol=1e-5) for k, v in expected.items())
    primal, derivative = jvp(lambda p: loss(model)(p, x), (params,), (tangent,))
    _, expected_derivative = jvp(lambda p: loss(reference)(p, x), (params,), (tangent,))
    assert torch.allclose(derivative, expected_derivative, rtol=1e-5)
    batched = vmap(lambda row: functional_call(model, params, (row,)))(x.view(8, 8, 16))
    assert torch.allclose(batched, functional_call(reference, params, (x.view(8, 8, 16),)), atol=1e-6)
    with forward_ad.dual_level():
        dual = forward_ad.make_dual(x, torch.ones_like(x))
        out = forward_ad.unpack_dual(model(dual)).tangent
        expected_out = forward_ad.unpack_dual(reference(dual)).tangent
    assert torch.allclose(out, expected_out, atol=1e-5)


@pytest.mark.parametrize("removed", ["merged", "merged_keep"])
def test_a_removed_forward_mode_is_read_as_auto_with_a_warning(tmp_path, removed, caplog):
    import json

    from peft import PeftConfig, PeftModel

    model = _model("llama", "auto")
    model.save_pretrained(tmp_path)
    config_file = tmp_path / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "forward_mode": removed}))
    loaded = PeftModel.from_pretrained(make_llama(), tmp_path)
    assert loaded.peft_config["default"].forward_mode == "auto"
    assert PeftConfig.from_pretrained(tmp_path).forward_mode == "auto"  # peft's own reader takes the same path
    with torch.no_grad():
        assert torch.equal(loaded(**example_inputs("llama")).logits, model(**example_inputs("llama")).logits)
    caplog.clear()
    assert PiCaConfig(forward_mode=removed).forward_mode == "auto"
    assert f"forward_mode='{removed}' was removed" in caplog.text
