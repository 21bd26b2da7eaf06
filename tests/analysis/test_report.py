"""Report on real PEFT models: PiCa's ΔW lies in W0's subspace, LoRA's does not; plots are written."""

import json
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model

from pica import PiCaConfig
from pica.analysis import analyze_models, weight_pairs
from pica.analysis.plots import plot_report
from tests.conftest import make_llama, randomize_updates


def test_pica_update_is_entirely_inside_the_top_subspace_and_the_model_is_untouched():
    model = get_peft_model(make_llama(), PiCaConfig(rank=4))
    randomize_updates(model, scale=1.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = analyze_models(make_llama(), model, rank=4)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert report["summary"]["changed_layers"] == 10  # q, k, v, up, down × 2 layers
    assert report["summary"]["energy_fraction"] == pytest.approx(1.0, abs=1e-9)
    assert set(report["roles"]) >= {"model.layers.*.self_attn.q_proj", "model.layers.*.mlp.down_proj"}
    o_proj = report["layers"]["model.layers.0.self_attn.o_proj"]
    assert o_proj["delta_norm"] == 0 and math.isnan(o_proj["energy_fraction"])
    json.dumps(report)  # JSON-ready (nan allowed)


def test_lora_update_sits_near_the_random_level():
    model = get_peft_model(make_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    report = analyze_models(make_llama(), model, rank=4, epsilon=0.5)
    summary = report["summary"]
    assert summary["changed_layers"] == 4
    assert summary["energy_fraction"] < 0.5
    assert summary["random_energy_fraction"] == pytest.approx(4 / 32)
    assert set(summary["intruders_sweep"]) == {"0.3", "0.4", "0.5", "0.6", "0.7", "0.8", "0.9"}
    sweep = list(summary["intruders_sweep"].values())
    assert sweep == sorted(sweep)  # more intruders at a stricter (larger) threshold


def test_weight_pairs_of_named_modules_and_errors():
    pairs = weight_pairs(make_llama(), make_llama(seed=1), names=["model.layers.1.mlp.down_proj"])
    w0, w = pairs["model.layers.1.mlp.down_proj"]
    assert w0.shape == w.shape == (32, 64) and not torch.equal(w0, w)
    with pytest.raises(ValueError, match="not linear modules"):
        weight_pairs(make_llama(), make_llama(), names=["model.layers.1.mlp"])


def test_plot_report_writes_pngs(tmp_path):
    model = get_peft_model(make_llama(), PiCaConfig(rank=4))
    randomize_updates(model)
    paths = plot_report(analyze_models(make_llama(), model, rank=4), tmp_path, title="tiny")
    assert [p.name for p in paths] == ["energy_fraction.png", "intruders.png", "intruders_sweep.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)
