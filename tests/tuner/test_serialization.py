"""Save/load round trips, one M per group on disk, fingerprint checks, rollback (DESIGN §4.6)."""

import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

from pica import PiCaConfig
from pica.io import AdapterFileError
from pica.tuner.layer import PiCaLayer
from tests.conftest import (
    example_inputs,
    make_bert_classifier,
    make_gpt2,
    make_llama,
    model_output,
    pica_layers,
    randomize_updates,
    update_ids_by_group,
)

FACTORIES = {"llama": make_llama, "gpt2": make_gpt2}


def _trained(kind: str, path: Path, **config) -> tuple[nn.Module, torch.Tensor]:
    model = get_peft_model(FACTORIES[kind](), PiCaConfig(rank=4, **config))
    randomize_updates(model, seed=3)
    model.save_pretrained(path)
    return model, model_output(model, example_inputs(kind))


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("share", [True, False])
def test_round_trip_reproduces_logits_and_stores_each_m_once(kind, share, tmp_path):
    model, expected = _trained(kind, tmp_path, share_across_layers=share)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    m_keys = [key for key in tensors if key.startswith("base_model.pica_M.")]
    n_layers = len(pica_layers(model))
    assert len(model.state_dict()) == len(set(model.state_dict()))  # and M once in state_dict()
    assert sum(key.startswith("base_model.pica_M.default.") for key in model.state_dict()) == len(m_keys)
    assert len(m_keys) == (n_layers // 2 if share else n_layers)  # 2 decoder layers in the tiny models
    assert sum(key.endswith(".pica_P") for key in tensors) == n_layers

    torch.manual_seed(123)  # a different seed must not matter
    loaded = PeftModel.from_pretrained(FACTORIES[kind](), tmp_path)
    assert torch.equal(model_output(loaded, example_inputs(kind)), expected)
    groups = update_ids_by_group(loaded)
    assert all(len(ids) == 1 for ids in groups.values())
    assert len([p for p in loaded.parameters() if p.requires_grad]) == 0  # inference mode by default


def test_round_trip_onto_bf16_base_keeps_sharing(tmp_path):
    _, expected = _trained("llama", tmp_path)
    loaded = PeftModel.from_pretrained(make_llama().to(torch.bfloat16), tmp_path, is_trainable=True)
    trainable = [p for p in loaded.parameters() if p.requires_grad]
    assert len(trainable) == 5 and all(p.dtype == torch.float32 for p in trainable)
    logits = model_output(loaded, example_inputs("llama")).float()
    assert (logits - expected).abs().max() < 0.1 * expected.abs().max()


def test_files_of_the_removed_storage_none_load_and_save_again_as_compact(tmp_path, caplog):
    """Issue 26 removed ``projector_storage="none"``: its files (no P, no sketch) load as they were saved, P
    recomputed; a new config asking for it gets ``"compact"``; saved again, the adapter has its sketches."""
    _, expected = _trained("llama", tmp_path / "old", projector_storage="compact")
    _corrupt(tmp_path / "old", lambda t: [t.pop(k) for k in [k for k in t if k.endswith(".pica_sketch")]])
    config_file = tmp_path / "old" / "adapter_config.json"  # what pica wrote for "none": M and fingerprints only
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "projector_storage": "none"}))
    with caplog.at_level(logging.WARNING, logger="pica.tuner.config"):
        loaded = PeftModel.from_pretrained(make_llama(), tmp_path / "old")
    assert "projector_storage='none' was removed" in caplog.text
    assert torch.allclose(model_output(loaded, example_inputs("llama")), expected, atol=1e-5)
    loaded.save_pretrained(tmp_path / "new")
    assert json.loads((tmp_path / "new" / "adapter_config.json").read_text())["projector_storage"] == "compact"
    assert any(key.endswith(".pica_sketch") for key in load_file(tmp_path / "new" / "adapter_model.safetensors"))
    again = PeftModel.from_pretrained(make_llama(), tmp_path / "new")
    assert torch.allclose(model_output(again, example_inputs("llama")), expected, atol=1e-5)
    assert PiCaConfig(projector_storage="none").projector_storage == "compact"
    second = PeftModel.from_pretrained(make_llama(), tmp_path / "new")  # load_adapter: peft parses the config itself
    second.load_adapter(tmp_path / "old", adapter_name="old")
    second.set_adapter("old")
    assert torch.allclose(model_output(second, example_inputs("llama")), expected, atol=1e-5)
    _corrupt(tmp_path / "new", lambda t: [t.pop(k) for k in [k for k in t if k.endswith(".pica_sketch")]])
    with pytest.raises(AdapterFileError, match="projector sketch missing"):  # a compact file that lost them
        PeftModel.from_pretrained(make_llama(), tmp_path / "new")


def _is_pristine(base: nn.Module, reference_modules) -> bool:
    modules = [(name, type(module)) for name, module in base.named_modules()]
    return modules == reference_modules and not any(isinstance(m, PiCaLayer) for m in base.modules())


def _corrupt(path: Path, edit) -> None:
    tensors = load_file(path / "adapter_model.safetensors")
    edit(tensors)
    save_file(tensors, path / "adapter_model.safetensors")


def _first(tensors: dict, suffix: str) -> str:
    if suffix == "pica_M":  # one M per group, stored under the group's key
        return next(key for key in sorted(tensors) if key.startswith("base_model.pica_M."))
    return next(key for key in sorted(tensors) if key.endswith(suffix))


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("other_base_same_shapes", "different base model"),
        ("other_base_other_shapes", "shape"),
        ("missing_m", "M of group .* missing"),
        ("wrong_shape_p", r"P has shape"),
        ("nan_m", "non-finite"),
        ("missing_fingerprint", "fingerprint missing"),
    ],
)
def test_bad_adapters_raise_and_leave_base_untouched(case, match, tmp_path):
    _trained("llama", tmp_path)
    base = make_llama()
    if case == "other_base_same_shapes":
        base = make_llama(seed=7)
    elif case == "other_base_other_shapes":
        base = make_llama(hidden_size=48)
    elif case == "missing_m":
        _corrupt(tmp_path, lambda t: [t.pop(k) for k in [k for k in t if k == "base_model.pica_M.model/layers/*/self_attn/q_proj"]])
    elif case == "wrong_shape_p":
        _corrupt(tmp_path, lambda t: t.__setitem__(_first(t, "pica_P"), torch.zeros(3, 32)))
    elif case == "nan_m":
        _corrupt(tmp_path, lambda t: t[_first(t, "pica_M")].fill_(float("nan")))
    elif case == "missing_fingerprint":
        _corrupt(tmp_path, lambda t: t.pop(_first(t, "pica_fingerprint")))
    reference_modules = [(name, type(module)) for name, module in base.named_modules()]
    reference_logits = model_output(base, example_inputs("llama"))
    with pytest.raises(ValueError, match=match):
        PeftModel.from_pretrained(base, tmp_path)
    assert _is_pristine(base, reference_modules)
    assert not hasattr(base, "peft_config")
    assert torch.equal(model_output(base, example_inputs("llama")), reference_logits)


def test_adapter_with_rank_edited_in_config_is_refused(tmp_path):
    _trained("llama", tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "rank": 3}))
    with pytest.raises(ValueError, match="shape"):
        PeftModel.from_pretrained(make_llama(), tmp_path)


def test_second_named_adapter_loads_and_failed_load_keeps_first(tmp_path):
    _, expected = _trained("llama", tmp_path / "a")
    loaded = PeftModel.from_pretrained(make_llama(), tmp_path / "a", adapter_name="first")
    _trained("llama", tmp_path / "b")
    loaded.load_adapter(tmp_path / "b", adapter_name="second")
    assert set(loaded.peft_config) == {"first", "second"}
    _corrupt(tmp_path / "b", lambda t: t[_first(t, "pica_M")].fill_(float("inf")))
    with pytest.raises(ValueError, match="non-finite"):
        loaded.load_adapter(tmp_path / "b", adapter_name="third")
    assert set(loaded.peft_config) == {"first", "second"}
    loaded.set_adapter("first")
    assert torch.equal(model_output(loaded, example_inputs("llama")), expected)


def test_modules_to_save_head_round_trip(tmp_path):
    model = get_peft_model(make_bert_classifier(), PiCaConfig(rank=4, modules_to_save=["classifier"]))
    randomize_updates(model)
    with torch.no_grad():
        model.base_model.model.classifier.modules_to_save["default"].weight.normal_()
    expected = model_output(model, example_inputs("bert"))
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_bert_classifier(), tmp_path)
    assert torch.equal(model_output(loaded, example_inputs("bert")), expected)


def test_fresh_process_reloads_in_another_dtype(tmp_path):
    _, expected = _trained("llama", tmp_path / "adapter")
    torch.save(expected, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import torch, peft, pica
        from tests.conftest import make_llama, example_inputs, model_output
        for dtype, tol in ((torch.float64, 1e-5), (torch.float32, 0.0), (torch.bfloat16, 0.1)):
            base = make_llama(seed=99)
            base.load_state_dict(make_llama().state_dict())
            model = peft.PeftModel.from_pretrained(base.to(dtype), {str(tmp_path / 'adapter')!r})
            logits = model_output(model, example_inputs("llama")).float()
            expected = torch.load({str(tmp_path / 'expected.pt')!r}, weights_only=True)
            error = (logits - expected).abs().max().item()
            assert error <= tol * expected.abs().max().item(), (dtype, error)
        print("ok")
        """
    )
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def test_low_cpu_mem_usage_load_keeps_sharing(tmp_path):
    _, expected = _trained("llama", tmp_path)
    loaded = PeftModel.from_pretrained(make_llama(), tmp_path, low_cpu_mem_usage=True, is_trainable=True)
    assert torch.equal(model_output(loaded, example_inputs("llama")), expected)
    assert len([p for p in loaded.parameters() if p.requires_grad]) == 5


def test_round_trip_every_architecture(model_kind, tmp_path):
    from tests.conftest import MODEL_FACTORIES

    config = PiCaConfig(rank=4, modules_to_save=["classifier"] if model_kind in ("bert", "vit") else None)
    model = get_peft_model(MODEL_FACTORIES[model_kind](), config)
    randomize_updates(model)
    expected = model_output(model, example_inputs(model_kind))
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(MODEL_FACTORIES[model_kind](), tmp_path)
    assert torch.equal(model_output(loaded, example_inputs(model_kind)), expected)
