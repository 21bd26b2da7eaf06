"""Evaluation modes give the eager outputs: torch.inference_mode, concurrent threads, torch.compile."""

from __future__ import annotations

import shutil
import sysconfig
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from peft import PeftModel, get_peft_model

from pica import PiCaConfig
from tests.conftest import example_inputs, make_llama, model_output, randomize_updates


@pytest.fixture(scope="module")
def adapted():
    model = get_peft_model(make_llama(), PiCaConfig(rank=4))
    randomize_updates(model, seed=8, scale=0.5)
    return model.eval()


def test_inference_mode_equals_eager(adapted):
    inputs = example_inputs("llama")
    expected = model_output(adapted, inputs)
    with torch.inference_mode():
        got = adapted(**inputs).logits
    assert torch.equal(got, expected)
    assert not torch.equal(expected, model_output(make_llama(), inputs))  # the adapter is active


def test_adapter_loaded_inside_inference_mode(adapted, tmp_path):
    adapted.save_pretrained(tmp_path)
    inputs = example_inputs("llama")
    with torch.inference_mode():
        loaded = PeftModel.from_pretrained(make_llama(), tmp_path)
        got = loaded(**inputs).logits
    assert torch.equal(got, model_output(adapted, inputs))


def test_concurrent_threads_give_eager_outputs(adapted):
    batches = [example_inputs("llama", seed=seed) for seed in range(8)]
    expected = [model_output(adapted, batch) for batch in batches]

    def run(batch):
        with torch.inference_mode():
            return adapted(**batch).logits

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(run, batches))
    assert all(torch.equal(got, want) for got, want in zip(results, expected))


def _compiler_available() -> bool:
    return shutil.which(sysconfig.get_config_var("CC") or "cc") is not None or shutil.which("g++") is not None


@pytest.mark.skipif(not _compiler_available(), reason="torch.compile (inductor) needs a C++ compiler on CPU")
def test_torch_compile_equals_eager(adapted):
    import torch._dynamo

    torch._dynamo.reset()
    inputs = example_inputs("llama")
    expected = model_output(adapted, inputs)
    compiled = torch.compile(adapted, backend="inductor")
    with torch.no_grad():
        got = compiled(**inputs).logits
    # inductor fuses and reorders float ops: equal up to fp32 rounding (measured 9e-8 of max |logit| ~ 1)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    explanation = torch._dynamo.explain(adapted)(**inputs)
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons
