"""Table of bad adapter directories: each load fails with a message naming the file/field/module and
leaves the base model exactly as it was (outputs, module tree, state-dict keys, no hooks, no peft_config).

Tensor-level cases already covered in ``test_serialization.py`` (other base with same/other shapes,
missing M, mis-shaped P, NaN in M, missing fingerprint) are not repeated here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

from pica import PiCaConfig
from pica.tuner.layer import PiCaLayer
from tests.conftest import example_inputs, make_llama, model_output, randomize_updates

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def _edit_config(path: Path, **changes) -> None:
    values = json.loads((path / CONFIG).read_text())
    for key, value in changes.items():
        if value is _DROP:
            values.pop(key)
        else:
            values[key] = value
    (path / CONFIG).write_text(json.dumps(values))


def _edit_tensors(path: Path, edit) -> None:
    tensors = load_file(path / WEIGHTS)
    edit(tensors)
    save_file(tensors, path / WEIGHTS)


def _first(tensors: dict, suffix: str) -> str:
    return next(key for key in sorted(tensors) if key.endswith(suffix))


_DROP = object()

# case id -> (how to break the saved adapter, regex the error message must match)
CASES = {
    "missing_directory": (lambda p: None, r"adapter directory .*does-not-exist does not exist"),
    "missing_weights": (lambda p: (p / WEIGHTS).unlink(), rf"{WEIGHTS} does not exist"),
    "empty_weights": (lambda p: (p / WEIGHTS).write_bytes(b""), rf"{WEIGHTS} is empty"),
    "truncated_weights": (
        lambda p: (p / WEIGHTS).write_bytes((p / WEIGHTS).read_bytes()[:-100]),
        rf"{WEIGHTS} is not a valid safetensors file .*incomplete",
    ),
    "random_bytes_weights": (
        lambda p: (p / WEIGHTS).write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                                           dtype=torch.uint8).numpy().tobytes()),
        rf"{WEIGHTS} is not a valid safetensors file",
    ),
    "missing_config": (lambda p: (p / CONFIG).unlink(), rf"{CONFIG} does not exist"),
    "config_not_json": (lambda p: (p / CONFIG).write_text('{"peft_type": "PICA", "rank": 4,'),
                        rf"{CONFIG} is not valid JSON: .*line 1"),
    "config_not_object": (lambda p: (p / CONFIG).write_text("[1, 2]"), rf"{CONFIG} must hold a JSON object"),
    "config_rank_wrong_type": (lambda p: _edit_config(p, rank="4"),
                               rf"{CONFIG}: PiCaConfig.rank must be a positive int"),
    "config_rank_zero": (lambda p: _edit_config(p, rank=0),
                         rf"{CONFIG}: PiCaConfig.rank must be a positive int, got 0"),
    "config_rank_negative": (lambda p: _edit_config(p, rank=-2), rf"{CONFIG}: PiCaConfig.rank .* got -2"),
    "config_bool_wrong_type": (lambda p: _edit_config(p, share_across_layers="yes"),
                               rf"{CONFIG}: PiCaConfig.share_across_layers must be a bool"),
    "config_unknown_peft_type": (lambda p: _edit_config(p, peft_type="PICA2"),
                                 rf"{CONFIG}: field 'peft_type' is 'PICA2', not a known PEFT method"),
    "config_missing_peft_type": (lambda p: _edit_config(p, peft_type=_DROP),
                                 rf"{CONFIG}: field 'peft_type' is missing"),
    "config_unknown_key": (lambda p: _edit_config(p, rank_pattern={"q_proj": 2}),
                           rf"{CONFIG}: PiCaConfig: unknown field\(s\) \['rank_pattern'\]"),
    "missing_projector_key": (lambda p: _edit_tensors(p, lambda t: t.pop(_first(t, "k_proj.pica_P"))),
                              r"model\.layers\.\d\.self_attn\.k_proj: P missing"),
    "wrong_shape_m": (
        lambda p: _edit_tensors(p, lambda t: t.__setitem__(_first(t, "mlp/up_proj"), torch.zeros(64, 5))),
        r"pica_M\.model/layers/\*/mlp/up_proj: M has shape \(64, 5\), expected \(out_features, 4\)",
    ),
    "infinite_projector": (lambda p: _edit_tensors(p, lambda t: t[_first(t, "v_proj.pica_P")].fill_(float("inf"))),
                           rf"{WEIGHTS}: 1 bad tensor\(s\): .*v_proj\.pica_P: non-finite values"),
}


def _snapshot(model: nn.Module) -> dict:
    """Everything a failed load must leave unchanged, except the outputs (compared separately)."""
    return {
        "modules": [(name, type(module)) for name, module in model.named_modules()],
        "state_keys": list(model.state_dict()),
        "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
                     for m in model.modules()),
        "attributes": sorted(vars(model)),
        "requires_grad": [p.requires_grad for p in model.parameters()],
    }


@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("good") / "adapter"
    model = get_peft_model(make_llama(), PiCaConfig(rank=4))
    randomize_updates(model, seed=5)
    model.save_pretrained(path)
    return path


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("loader", ["from_pretrained", "load_adapter"])
def test_bad_adapter_raises_naming_the_problem_and_leaves_model_as_it_was(case, loader, saved_adapter, tmp_path):
    break_it, message = CASES[case]
    path = tmp_path / ("does-not-exist" if case == "missing_directory" else "adapter")
    if case != "missing_directory":
        os.makedirs(path)
        for name in (WEIGHTS, CONFIG):
            (path / name).write_bytes((saved_adapter / name).read_bytes())
        break_it(path)
    inputs = example_inputs("llama")
    if loader == "from_pretrained":
        model = make_llama()
        before, logits = _snapshot(model), model_output(model, inputs)
        with pytest.raises(ValueError, match=message) as raised:
            PeftModel.from_pretrained(model, path)
        assert not hasattr(model, "peft_config")
    else:  # a second adapter into a PeftModel that already holds a good one
        model = PeftModel.from_pretrained(make_llama(), saved_adapter, adapter_name="good")
        before, logits = _snapshot(model), model_output(model, inputs)
        with pytest.raises(ValueError, match=message) as raised:
            model.load_adapter(path, adapter_name="bad")
        assert list(model.peft_config) == ["good"]
    assert str(path) in str(raised.value)  # every message names the adapter directory or file
    assert _snapshot(model) == before
    assert torch.equal(model_output(model, inputs), logits)
    assert all(not isinstance(m, PiCaLayer) or set(m.pica_P) <= {"good"} for m in model.modules())


def test_table_has_at_least_twelve_cases():
    assert len(CASES) >= 12
