"""Operations users apply to a whole PEFT model: dtype casts, device moves, ``to_empty``, deepcopy, state dicts.

Each must leave an adapter that saves and loads with the logits the model had. ``P`` stays float32 and
the fingerprints float64 under a cast (they describe the base weight); ``M`` follows the cast, as peft's
LoRA weights do (docs/guarantees.md).
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel, get_peft_model

from pica import PiCaConfig
from tests.conftest import make_llama, pica_layers, randomize_updates

INPUTS = torch.randint(1, 96, (2, 7), generator=torch.Generator().manual_seed(0))


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(INPUTS).logits.float()


def _adapted():
    model = get_peft_model(make_llama(), PiCaConfig(rank=4))
    randomize_updates(model)
    return model


CASTS = {
    "to(bfloat16)": (lambda m: m.to(torch.bfloat16), torch.bfloat16),
    "half()": (lambda m: m.half(), torch.float16),
    "double()": (lambda m: m.double(), torch.float64),
    "to(float16, cpu)": (lambda m: m.to("cpu", torch.float16), torch.float16),
}


@pytest.mark.parametrize("name", list(CASTS))
def test_a_cast_model_saves_an_adapter_that_loads_with_its_logits(name, tmp_path):
    cast, dtype = CASTS[name]
    model = cast(_adapted())
    for layer in pica_layers(model).values():
        assert layer.pica_P["default"].dtype == torch.float32 and layer.pica_fingerprint["default"].dtype == torch.float64
        assert layer.get_update("default").dtype == dtype  # M follows the cast
    logits = _logits(model)
    model.save_pretrained(tmp_path / "adapter")
    if dtype != torch.float64:  # M kept in the base's half dtype, as the cast model held it: bit for bit
        same = PeftModel.from_pretrained(make_llama().to(dtype), tmp_path / "adapter", autocast_adapter_dtype=False)
        assert torch.equal(_logits(same), logits)
    # peft's default keeps M in float32: the PiCa term is then computed in float32, within the dtype's rounding
    default = PeftModel.from_pretrained(make_llama().to(dtype), tmp_path / "adapter")
    tolerance = {torch.float64: 1e-6, torch.bfloat16: 3e-2, torch.float16: 4e-3}[dtype]  # a few ulps
    assert float((_logits(default) - logits).abs().max()) <= tolerance * float(logits.abs().max())


@pytest.mark.parametrize("operation", ["deepcopy", "state_dict", "to_empty+load", "to(cpu)"])
def test_copies_and_moves_keep_an_adapter_that_saves_and_loads(operation, tmp_path):
    model = _adapted()
    logits = _logits(model)
    if operation == "deepcopy":
        model = copy.deepcopy(model)
    elif operation == "state_dict":
        other = get_peft_model(make_llama(), PiCaConfig(rank=4))
        other.load_state_dict(model.state_dict())
        model = other
    elif operation == "to_empty+load":
        state = {key: value.clone() for key, value in model.state_dict().items()}
        transient = {key: value.clone() for key, value in model.named_buffers() if key not in state}  # rotary inv_freq
        model.to_empty(device="cpu")
        model.load_state_dict(state)
        with torch.no_grad():  # to_empty also empties the model's non-persistent buffers: transformers', not pica's
            for key, value in transient.items():
                model.get_buffer(key).copy_(value)
    else:
        model = model.to("cpu")
    assert torch.equal(_logits(model), logits)
    model.save_pretrained(tmp_path / "adapter")
    assert torch.equal(_logits(PeftModel.from_pretrained(make_llama(), tmp_path / "adapter")), logits)


def test_an_adapter_made_on_a_meta_base_says_its_p_was_never_computed_until_loaded(tmp_path):
    """Issue: after ``to_empty()`` and the real weights, the model claimed "trained on a different base weight"."""
    from peft import set_peft_model_state_dict

    real = _adapted()
    real.save_pretrained(tmp_path / "real")
    with torch.device("meta"):
        base = make_llama()
    model = get_peft_model(base, PiCaConfig(rank=4))  # allowed: ranks that hold no weights (FSDP rank-0 loading)
    model.to_empty(device="cpu")
    source = make_llama()
    weights = source.state_dict()
    plain = {key: weights[key.replace(".base_layer", "")] for key in model.base_model.model.state_dict()
             if ".pica_" not in key and key.replace(".base_layer", "") in weights}
    model.base_model.model.load_state_dict(plain, strict=False)  # the real base weights: no bogus refusal
    with torch.no_grad():  # to_empty also emptied the non-persistent rotary buffer (transformers', not pica's)
        for key, value in source.named_buffers():
            if key not in weights:
                model.base_model.model.get_buffer(key).copy_(value)
    for attempt in (lambda: model(INPUTS), lambda: model.save_pretrained(tmp_path / "bad"),
                    lambda: model.merge_adapter()):
        with pytest.raises(RuntimeError, match=r"P of this \(\d+×\d+\) layer .* was never computed: .*meta device"):
            attempt()
    assert not (tmp_path / "bad").exists()
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(tmp_path / "real" / "adapter_model.safetensors"))
    assert torch.equal(_logits(model), _logits(real))
