"""Adapters written by pica 0.1.0 (``M`` saved under a member layer's path) still load, with the same logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from tests.conftest import make_gpt2, make_llama

DATA = Path(__file__).resolve().parents[1] / "data" / "adapters_v0_1"
CASES = {
    "llama_shared_full": "llama",
    "llama_unshared_full": "llama",
    "llama_shared_compact": "llama",
    "gpt2_shared_full": "gpt2",
}


def _base(kind: str) -> torch.nn.Module:
    model = {"llama": make_llama, "gpt2": make_gpt2}[kind](seed=1)  # other random weights, then the stored ones
    missing, unexpected = model.load_state_dict(load_file(DATA / f"base_{kind}.safetensors"), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    if kind == "gpt2":
        model.tie_weights()
    return model


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_v0_1_adapter_loads_with_the_logits_it_was_saved_with(name):
    inputs = load_file(DATA / "inputs.safetensors")["input_ids"]
    expected = load_file(DATA / "expected_logits.safetensors")[name]
    model = PeftModel.from_pretrained(_base(CASES[name]), DATA / name)
    with torch.no_grad():
        logits = model(input_ids=inputs).logits
    if name.endswith("compact"):  # P recomputed from the base weights at load: equal up to fp32 rounding
        torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
    else:
        assert torch.equal(logits, expected)
    assert (logits - _base(CASES[name])(input_ids=inputs).logits).abs().max() > 1e-2  # the adapter matters
