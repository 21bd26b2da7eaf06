"""Bounded cost of the regular expressions an adapter file makes peft run (pica.patterns)."""

from __future__ import annotations

import time

import pytest

from pica import patterns
from pica.patterns import PatternCostError, check_pattern_cost

NAMES = [f"model.layers.{i}.{part}" for i in range(2) for part in
         ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
          "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")]


@pytest.mark.parametrize("config", [
    {"target_modules": r"(?:[\w.]+)+!"},  # the issue's file: exponential in the name's length
    {"target_modules": ["q_proj"], "exclude_modules": r"(.*)*\.x"},
    {"target_modules": ["q_proj"], "modules_to_save": [r"([\w.]+)+!"]},
    {"target_modules": ["q_proj"], "layers_to_transform": [0], "layers_pattern": [r"(\w+\.?)+!"]},
])
def test_a_backtracking_pattern_from_a_file_is_refused_in_bounded_time(config):
    started = time.perf_counter()
    with pytest.raises(PatternCostError, match=r"adapter_config.json: matching .* takes more than 2 s"):
        check_pattern_cost(config, NAMES, "adapter_config.json", seconds=2)
    assert time.perf_counter() - started < 10


def test_usual_patterns_pass_and_plain_names_start_no_process(monkeypatch):
    check_pattern_cost({"target_modules": r".*\.(q_proj|v_proj)", "modules_to_save": ["lm_head"]}, NAMES, "f")
    monkeypatch.setattr(patterns.subprocess, "run", lambda *a, **k: pytest.fail("no process for plain names"))
    check_pattern_cost({"target_modules": ["q_proj", "v_proj"], "modules_to_save": ["classifier", "score"],
                        "exclude_modules": ["lm_head"], "layers_pattern": "layers", "layers_to_transform": [0]},
                       NAMES, "f")


def test_an_invalid_pattern_is_named():
    with pytest.raises(PatternCostError, match=r"f: exclude_modules is not a valid regular expression"):
        check_pattern_cost({"exclude_modules": "(unclosed"}, NAMES, "f")


def test_peft_model_from_pretrained_refuses_the_issues_file_in_bounded_time(tmp_path, monkeypatch):
    """Issue: a 653-byte adapter_config.json made ``PeftModel.from_pretrained`` run for minutes (killed after 90 s)."""
    import json

    from peft import PeftModel, get_peft_model

    from pica import PiCaConfig
    from pica.io import AdapterFileError
    from tests.conftest import make_llama, pica_layers

    get_peft_model(make_llama(), PiCaConfig(rank=4)).save_pretrained(tmp_path / "adapter")
    config_path = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["target_modules"] = r"(?:[\w.]+)+!|.*\.(q_proj|k_proj|v_proj|up_proj|down_proj)"
    config_path.write_text(json.dumps(config))
    monkeypatch.setattr(patterns, "PATTERN_SECONDS", 2.0)
    base = make_llama()
    started = time.perf_counter()
    with pytest.raises(AdapterFileError, match=r"adapter_config.json: matching \['target_modules'\] .* more than 2 s"):
        PeftModel.from_pretrained(base, tmp_path / "adapter")
    assert time.perf_counter() - started < 15 and not pica_layers(base)
