"""Model-level behaviour: identity, sharing, trainability, targeting, adapters (DESIGN §4.1, 4.4, 4.5, 4.7, 4.8)."""

import copy

import peft
import pytest
import torch
from peft import get_peft_model
from torch import nn
from transformers import GemmaConfig, GemmaForCausalLM

from pica import PiCaConfig
from pica.tuner.layer import PiCaLayer
from tests.conftest import (
    MODEL_FACTORIES,
    example_inputs,
    make_bert_classifier,
    make_gpt2,
    make_llama,
    model_output,
    pica_layers,
    randomize_updates,
    update_ids_by_group,
)

EXPECTED_TARGETS = {  # leaf roles adapted by default per tiny model
    "llama": {"q_proj", "k_proj", "v_proj", "up_proj", "down_proj"},
    "gpt2": {"c_attn", "c_fc"},
    "bert": {"query", "key", "value", "dense"},
    "vit": {"q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"},
}


def test_identity_at_init_is_bitwise(model_kind):
    base = MODEL_FACTORIES[model_kind]()
    inputs = example_inputs(model_kind)
    reference = model_output(base, inputs)
    model = get_peft_model(base, PiCaConfig(rank=4))
    assert torch.equal(model_output(model, inputs), reference)
    assert {name.rsplit(".", 1)[-1] for name in pica_layers(model)} == EXPECTED_TARGETS[model_kind]


def test_bert_defaults_skip_pooler_and_separate_dense_roles():
    model = get_peft_model(make_bert_classifier(), PiCaConfig(rank=4))
    names = pica_layers(model)
    assert not any("pooler" in name for name in names)
    groups = {layer.pica_group["default"] for layer in names.values()}
    assert len(groups) == 6  # query, key, value, attention.output.dense, intermediate.dense, output.dense


def _trainable(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def test_sharing_one_tensor_per_group_and_param_count():
    model = get_peft_model(make_llama(), PiCaConfig(rank=4))
    trainable = _trainable(model)
    assert len(trainable) == 5  # q, k, v, up, down
    assert sum(p.numel() for p in trainable) == 4 * (32 + 16 + 16 + 64 + 32)
    assert model.get_nb_trainable_parameters()[0] == 4 * (32 + 16 + 16 + 64 + 32)
    unshared = get_peft_model(make_llama(), PiCaConfig(rank=4, share_across_layers=False))
    assert len(_trainable(unshared)) == 10


def test_shared_gradient_is_sum_of_per_layer_gradients():
    model = get_peft_model(make_llama(), PiCaConfig(rank=4, target_modules=["q_proj"]))
    randomize_updates(model)
    layers = list(pica_layers(model).values())
    captured = {}

    def keep(module, inputs, output):
        output.retain_grad()
        captured[module] = (inputs[0], output)

    handles = [layer.register_forward_hook(keep) for layer in layers]
    model(**example_inputs("llama")).logits.pow(2).mean().backward()
    for handle in handles:
        handle.remove()
    shared = layers[0].get_update("default")
    expected = torch.zeros_like(shared)
    for layer in layers:
        x, out = captured[layer]
        coordinates = x.reshape(-1, x.shape[-1]) @ layer.pica_P["default"].T  # (N, rank)
        expected += out.grad.reshape(-1, out.shape[-1]).T @ coordinates
    assert all(layer.get_update("default") is shared for layer in layers)
    assert torch.allclose(shared.grad, expected, atol=1e-6, rtol=1e-4)


def test_sharing_survives_dtype_deepcopy_and_optimizer_step():
    model = get_peft_model(make_llama(), PiCaConfig(rank=4))
    for candidate in (copy.deepcopy(model), model.to(torch.float64), model.to(torch.float32)):
        groups = update_ids_by_group(candidate)
        assert len(groups) == 5 and all(len(ids) == 1 for ids in groups.values())
    optimizer = torch.optim.AdamW(_trainable(model), lr=1e-2)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == 5
    model(**example_inputs("llama")).logits.sum().backward()
    optimizer.step()
    layers = [layer for name, layer in pica_layers(model).items() if name.endswith("q_proj")]
    assert layers[0].get_update("default") is layers[1].get_update("default")
    assert layers[0].get_update("default").abs().sum() > 0


def test_only_m_and_modules_to_save_change_after_training_steps():
    model = get_peft_model(make_bert_classifier(), PiCaConfig(rank=4, modules_to_save=["classifier"]))
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    optimizer = torch.optim.AdamW(_trainable(model), lr=1e-2)
    model.train()
    for _ in range(3):
        output = model(**example_inputs("bert"), labels=torch.tensor([0, 2]))
        output.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {name for name, tensor in model.state_dict().items() if not torch.equal(tensor, before[name])}
    assert changed
    for name in changed:
        assert ".pica_M." in name or ".modules_to_save.default." in name, name
    assert any(".modules_to_save.default." in name for name in changed)


def test_m_stays_fp32_on_bf16_base_and_forward_is_finite():
    base = make_llama().to(torch.bfloat16)
    model = get_peft_model(base, PiCaConfig(rank=4))
    randomize_updates(model)
    layers = pica_layers(model).values()
    assert all(layer.get_update("default").dtype == torch.float32 for layer in layers)
    assert all(layer.pica_P["default"].dtype == torch.float32 for layer in layers)
    logits = model_output(model, example_inputs("llama"))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    assert len({id(p) for p in _trainable(model)}) == 5


def test_fp16_base_forward_is_finite():
    model = get_peft_model(make_gpt2().to(torch.float16), PiCaConfig(rank=4))
    randomize_updates(model)
    assert torch.isfinite(model_output(model, example_inputs("gpt2"))).all()


def test_projector_dtype_float64_matches_float32_projector():
    p32 = pica_layers(get_peft_model(make_llama(), PiCaConfig(rank=4)))
    p64 = pica_layers(get_peft_model(make_llama(), PiCaConfig(rank=4, projector_dtype="float64")))
    for name in p32:
        assert torch.allclose(p32[name].pica_P["default"], p64[name].pica_P["default"], atol=1e-4)


@pytest.mark.parametrize(
    ("target_modules", "expected"),
    [
        (["q_proj"], {"model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"}),
        (["layers.1.self_attn.q_proj"], {"model.layers.1.self_attn.q_proj"}),
        (["proj"], set()),  # suffix match is by dotted component, never substring
        (r"model\.layers\.0\.mlp\.(up|down)_proj", {"model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"}),
        (r"q_proj", set()),  # a regex must match the whole path
    ],
)
def test_exact_target_matching(target_modules, expected):
    base = make_llama()
    if not expected:
        with pytest.raises(ValueError, match="matched no module.*q_proj"):
            get_peft_model(base, PiCaConfig(rank=4, target_modules=target_modules))
        return
    model = get_peft_model(base, PiCaConfig(rank=4, target_modules=target_modules))
    assert {name.removeprefix("base_model.model.") for name in pica_layers(model)} == expected


def test_exclude_and_layers_to_transform():
    model = get_peft_model(make_llama(), PiCaConfig(rank=4, target_modules=["q_proj", "v_proj"],
                                                     exclude_modules=["v_proj"], layers_to_transform=[1]))
    assert [n.removeprefix("base_model.model.") for n in pica_layers(model)] == ["model.layers.1.self_attn.q_proj"]


def _snapshot(model: nn.Module):
    return [(name, type(module)) for name, module in model.named_modules()], sorted(model.state_dict())


@pytest.mark.parametrize(
    ("config", "error", "match"),
    [
        (PiCaConfig(rank=17, target_modules=["k_proj", "q_proj"]), ValueError, r"rank=17 exceeds.*k_proj \(16, 32\)"),
        (PiCaConfig(rank=4, target_modules=["nothing"]), ValueError, "matched no module.*q_proj"),
        (PiCaConfig(rank=4, target_modules=["embed_tokens"]), TypeError, "embed_tokens"),
        (PiCaConfig(rank=4, target_modules=r".*layers\.0\.self_attn\.(q|k)_proj", share_across_layers=True), None, None),
    ],
)
def test_bad_targets_leave_model_untouched(config, error, match):
    base = make_llama()
    before = _snapshot(base)
    if error is None:
        get_peft_model(base, config)  # q and k are in different roles: fine
        return
    with pytest.raises(error, match=match):
        get_peft_model(base, config)
    assert _snapshot(base) == before and not hasattr(base, "peft_config")


def test_mixed_out_features_in_a_group_is_an_error():
    base = make_llama()
    base.model.layers[1].self_attn.q_proj = nn.Linear(32, 48, bias=False)
    with pytest.raises(ValueError, match=r"model\.layers\.\*\.self_attn\.q_proj.*out_features=48"):
        get_peft_model(base, PiCaConfig(rank=4, target_modules=["q_proj"]))
    assert type(base.model.layers[0].self_attn.q_proj) is nn.Linear


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_base_weight_is_an_error(value, dtype):
    base = make_llama().to(dtype)
    with torch.no_grad():
        base.model.layers[0].mlp.up_proj.weight[0, 0] = value
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj.*non-finite"):
        get_peft_model(base, PiCaConfig(rank=4))
    assert not any(isinstance(m, PiCaLayer) for m in base.modules())


def test_huge_finite_base_weights_are_accepted():
    """The finiteness test is the float64 norm of the weight: entries at float32's largest do not overflow it."""
    base = make_llama()
    with torch.no_grad():
        base.model.layers[0].mlp.up_proj.weight.fill_(torch.finfo(torch.float32).max)
        base.model.layers[0].mlp.up_proj.weight[0, 0] = 1.0  # a rank > 1 weight
    get_peft_model(base, PiCaConfig(rank=1))


def test_several_named_adapters_add_set_delete():
    base = make_llama()
    inputs = example_inputs("llama")
    reference = model_output(base, inputs)
    model = get_peft_model(base, PiCaConfig(rank=4))
    randomize_updates(model, seed=1)
    out_default = model_output(model, inputs)
    model.add_adapter("second", PiCaConfig(rank=2, target_modules=["q_proj"]))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.get_update("second").shape == (32, 2) and not layer.get_update("second").requires_grad
    assert torch.equal(model_output(model, inputs), out_default)  # "default" still active
    model.set_adapter("second")
    assert layer.get_update("second").requires_grad and not layer.get_update("default").requires_grad
    assert torch.equal(model_output(model, inputs), reference)  # second's M is zero
    with model.disable_adapter():
        assert torch.equal(model_output(model, inputs), reference)
    model.set_adapter("default")
    model.delete_adapter("second")
    assert "second" not in model.base_model.pica_M and "second" not in layer.pica_P
    assert not any(".second" in key for key in model.state_dict())
    assert torch.equal(model_output(model, inputs), out_default)


def test_merge_and_unload_and_unload():
    inputs = example_inputs("gpt2")
    model = get_peft_model(make_gpt2(), PiCaConfig(rank=4))
    randomize_updates(model)
    adapted = model_output(model, inputs)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, PiCaLayer) for m in merged.modules())
    assert torch.allclose(model_output(merged, inputs), adapted, atol=1e-5)

    base = make_llama()
    reference = model_output(base, example_inputs("llama"))
    wrapped = get_peft_model(base, PiCaConfig(rank=4))
    randomize_updates(wrapped)
    unloaded = wrapped.unload()
    assert torch.equal(model_output(unloaded, example_inputs("llama")), reference)


def test_gemma_2b_shapes_report_paper_parameter_count():
    config = GemmaConfig(vocab_size=256000, hidden_size=2048, intermediate_size=16384, num_hidden_layers=18,
                         num_attention_heads=8, num_key_value_heads=1, head_dim=256)
    with torch.device("meta"):
        base = GemmaForCausalLM(config)
    model = get_peft_model(base, PiCaConfig(rank=256))
    assert model.get_nb_trainable_parameters()[0] == 5_373_952
    assert len(pica_layers(model)) == 18 * 5


def test_peft_type_is_registered():
    assert peft.PeftType.PICA in peft.mapping.PEFT_TYPE_TO_TUNER_MAPPING
    import importlib

    import pica.tuner

    importlib.reload(pica.tuner)
    pica.tuner.register()  # second registration is a no-op
    assert peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING[peft.PeftType.PICA] is pica.tuner.PiCaConfig


def test_inference_mode_forward_equals_eager_and_works_when_built_inside():
    model = get_peft_model(make_llama(), PiCaConfig(rank=4))
    randomize_updates(model)
    inputs = example_inputs("llama")
    expected = model_output(model, inputs)
    with torch.inference_mode():
        assert torch.equal(model(**inputs).logits, expected)
        built_inside = get_peft_model(make_llama(), PiCaConfig(rank=4))
        assert torch.isfinite(built_inside(**inputs).logits).all()


def test_targets_whose_forward_is_never_called_are_refused():
    """nn.MultiheadAttention reads out_proj.weight directly: PiCa there would be accepted and do nothing."""

    class WithAttention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.attention(x, x, x)[0])

    for targets, match in ((["out_proj"], "never change the output"), (["attention"], "nn.Linear and transformers Conv1D only")):
        model = WithAttention()
        with pytest.raises(TypeError, match=match):
            get_peft_model(model, PiCaConfig(rank=2, target_modules=targets))
        assert not pica_layers(model)
    get_peft_model(WithAttention(), PiCaConfig(rank=2, target_modules=["head"]))  # a plain Linear is fine
