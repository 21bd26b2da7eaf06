"""peft API semantics PiCa follows (issue 18): ``init_weights`` and ``autocast_adapter_dtype``."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model

from pica import PiCaConfig
from pica.io import AdapterFileError
from tests.conftest import example_inputs, make_llama, model_output


def _updates(model) -> dict[str, torch.Tensor]:
    return {name: p for name, p in model.named_parameters() if ".pica_M." in name}


def test_init_weights_false_gives_a_random_m_that_changes_the_output():
    base = make_llama()
    reference = model_output(base, example_inputs("llama"))
    base = make_llama()  # make_llama seeds torch itself: seed after it
    torch.manual_seed(0)
    model = get_peft_model(base, PiCaConfig(rank=4, init_weights=False))
    updates = _updates(model)
    assert all(u.abs().max() > 0 for u in updates.values())
    assert all(abs(u.std().item() - 0.1 / 2) < 0.03 for u in updates.values())  # std 0.1/sqrt(rank)
    assert not torch.allclose(model_output(model, example_inputs("llama")), reference, atol=1e-4)
    base = make_llama()
    torch.manual_seed(1)
    other = get_peft_model(base, PiCaConfig(rank=4, init_weights=False))
    assert not torch.equal(model_output(other, example_inputs("llama")), model_output(model, example_inputs("llama")))
    with model.disable_adapter():
        assert torch.equal(model_output(model, example_inputs("llama")), reference)
    default = get_peft_model(make_llama(), PiCaConfig(rank=4))
    assert all(torch.count_nonzero(u) == 0 for u in _updates(default).values())


def test_init_weights_is_saved_and_the_file_m_wins_at_load(tmp_path):
    torch.manual_seed(0)
    model = get_peft_model(make_llama(), PiCaConfig(rank=4, init_weights=False))
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_llama(), tmp_path)
    assert loaded.peft_config["default"].init_weights is False
    assert torch.equal(model_output(loaded, example_inputs("llama")), model_output(model, example_inputs("llama")))
    with pytest.raises(ValueError, match="init_weights must be a bool"):
        PiCaConfig(init_weights="no")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_adapter_dtype_false_stores_m_in_the_model_dtype(dtype, tmp_path):
    model = get_peft_model(make_llama().to(dtype), PiCaConfig(rank=4, init_weights=False),
                           autocast_adapter_dtype=False)
    updates = _updates(model)
    assert {u.dtype for u in updates.values()} == {dtype}
    assert len(updates) == 5  # still one M per group, registered once
    inputs = example_inputs("llama")
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    assert all(u.grad is not None and u.grad.dtype == dtype for u in updates.values())
    default = get_peft_model(make_llama().to(dtype), PiCaConfig(rank=4))
    assert {u.dtype for u in _updates(default).values()} == {torch.float32}  # peft's default: float32 adapters
    model.save_pretrained(tmp_path)
    kept = PeftModel.from_pretrained(make_llama().to(dtype), tmp_path, autocast_adapter_dtype=False)
    assert {u.dtype for u in _updates(kept).values()} == {dtype}
    assert torch.equal(model_output(kept, inputs), model_output(model, inputs))
    upcast = PeftModel.from_pretrained(make_llama().to(dtype), tmp_path)
    assert {u.dtype for u in _updates(upcast).values()} == {torch.float32}
    for name, u in _updates(upcast).items():
        assert torch.equal(u, _updates(kept)[name].float())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_adapter_dtype_false_with_low_cpu_mem_usage_loads(dtype, tmp_path):
    # M is on the meta device when peft casts it in PeftModel.__init__ (low_cpu_mem_usage=True); the cast
    # must not read its values then (it raised "Tensor.item() cannot be called on meta tensors").
    model = get_peft_model(make_llama().to(dtype), PiCaConfig(rank=4, init_weights=False),
                           autocast_adapter_dtype=False)
    model.save_pretrained(tmp_path)
    inputs = example_inputs("llama")
    loaded = PeftModel.from_pretrained(make_llama().to(dtype), tmp_path, autocast_adapter_dtype=False,
                                       low_cpu_mem_usage=True)
    assert {(u.dtype, u.device.type) for u in _updates(loaded).values()} == {(dtype, "cpu")}
    assert torch.equal(model_output(loaded, inputs), model_output(model, inputs))
    loaded.load_adapter(tmp_path, adapter_name="other", autocast_adapter_dtype=False, low_cpu_mem_usage=True)
    assert {u.dtype for u in _updates(loaded).values()} == {dtype}


def test_autocast_adapter_dtype_false_on_float32_keeps_float32_and_refuses_overflow(tmp_path):
    model = get_peft_model(make_llama(), PiCaConfig(rank=4), autocast_adapter_dtype=False)
    assert {u.dtype for u in _updates(model).values()} == {torch.float32}
    big = get_peft_model(make_llama().to(torch.float16), PiCaConfig(rank=4))
    with torch.no_grad():
        next(iter(_updates(big).values())).fill_(1e6)  # fits float32, not float16
    big.save_pretrained(tmp_path)
    with pytest.raises((ValueError, AdapterFileError), match="not finite in torch.float16"):
        PeftModel.from_pretrained(make_llama().to(torch.float16), tmp_path, autocast_adapter_dtype=False)


def test_from_pretrained_takes_torch_device_and_a_device_map_that_names_where_the_model_is(tmp_path):
    # peft's from_pretrained passes torch_device on to load_adapter, which honours it; it was refused as
    # unknown. A device_map naming the one device an undispatched model is on changes nothing and is taken;
    # one asking for a dispatch ("auto") or another device is still refused (peft would ignore it).
    torch.manual_seed(0)
    model = get_peft_model(make_llama(), PiCaConfig(rank=4, init_weights=False))
    model.save_pretrained(tmp_path)
    inputs = example_inputs("llama")
    expected = model_output(model, inputs)
    loaded = PeftModel.from_pretrained(make_llama(), tmp_path, torch_device="cpu")
    assert torch.equal(model_output(loaded, inputs), expected)
    loaded.load_adapter(tmp_path, adapter_name="other", torch_device="cpu")
    for device_map in ({"": "cpu"}, "cpu", torch.device("cpu")):
        loaded = PeftModel.from_pretrained(make_llama(), tmp_path, device_map=device_map)
        assert torch.equal(model_output(loaded, inputs), expected)
    for device_map in ("auto", {"": "meta"}, {"model.embed_tokens": "cpu"}):
        with pytest.raises(ValueError, match=r"\['device_map'\] apply only to a model dispatched"):
            PeftModel.from_pretrained(make_llama(), tmp_path, device_map=device_map)


def test_no_m_is_trainable_inside_disable_adapter_and_each_gets_its_flag_back():
    """peft's TestRequiresGrad: LoRA has no trainable adapter weight inside ``disable_adapter()``."""
    model = get_peft_model(make_llama(), PiCaConfig(rank=4))
    model.add_adapter("frozen", PiCaConfig(rank=4))
    model.set_requires_grad("frozen", requires_grad=False)
    before = {name: p.requires_grad for name, p in model.named_parameters() if ".pica_M." in name}
    assert any(before.values()) and not all(before.values())
    with model.disable_adapter():
        assert not any(p.requires_grad for name, p in model.named_parameters() if ".pica_M." in name)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad] or [torch.zeros(1)])
        assert not any(p is q for group in optimizer.param_groups for p in group["params"]
                       for name, q in model.named_parameters() if ".pica_M." in name)
    assert {name: p.requires_grad for name, p in model.named_parameters() if ".pica_M." in name} == before


class _TwoLinears(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0, self.lin1 = torch.nn.Linear(10, 20), torch.nn.Linear(20, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(self.lin0(x))


def test_errors_peft_tests_match_carry_peft_wording_and_pica_details():
    """peft's test_custom_models/test_decoder_models match these messages (found by the conformance run)."""
    with pytest.raises(ValueError, match="Please specify `target_modules`") as error:  # no default for the model
        get_peft_model(_TwoLinears(), PiCaConfig(rank=2))
    assert "has no default" in str(error.value)

    torch.manual_seed(0)
    model = get_peft_model(_TwoLinears(), PiCaConfig(target_modules=["lin0"], rank=2, init_weights=False)).eval()
    model.add_adapter("other", PiCaConfig(target_modules=["lin0"], rank=2, init_weights=False))
    x = torch.randn(4, 10)
    wording = "Trying to infer with non-existing adapter\\(s\\): does-not-exist, other-does-not-exist"
    with pytest.raises(ValueError, match=wording + r".*do not exist: \['does-not-exist', 'other-does-not-exist'\]"):
        model(x, adapter_names=["does-not-exist", "other-does-not-exist", "other", "default"])

    with torch.no_grad():
        model.base_model.pica_M["other"]["lin0"][0] = torch.nan
    weight = model.base_model.model.lin0.get_base_layer().weight.detach().clone()
    for merge in (lambda: model.base_model.merge_adapter(["default", "other"], safe_merge=True),
                  lambda: model.base_model.model.lin0.merge(safe_merge=True, adapter_names=["default", "other"])):
        # peft's wording names the broken adapter (only "other" is non-finite), then which modules; nothing merged
        with pytest.raises(ValueError, match="NaNs detected in the merged weights. The adapter other seems to be bro"):
            merge()
        assert torch.equal(model.base_model.model.lin0.get_base_layer().weight, weight)
        assert model.base_model.model.lin0.merged_adapters == []
