"""Default targets: each architecture gets PiCa's roles (attention q/k/v, MLP up/down) under its own names."""

from __future__ import annotations

import pytest
import torch
import transformers
from peft import get_peft_model

from pica import PiCaConfig
from tests.conftest import model_output, pica_layers

TINY = dict(vocab_size=96, num_hidden_layers=2, num_attention_heads=4)
CASES = {  # model_type: (config class, model class, extra config, expected leaf names)
    "opt": ("OPTConfig", "OPTForCausalLM", dict(hidden_size=32, ffn_dim=64, word_embed_proj_dim=32),
            {"q_proj", "k_proj", "v_proj", "fc1", "fc2"}),
    "gptj": ("GPTJConfig", "GPTJForCausalLM", dict(n_embd=32, n_layer=2, n_head=4, rotary_dim=4),
             {"q_proj", "k_proj", "v_proj", "fc_in", "fc_out"}),
    "phi": ("PhiConfig", "PhiForCausalLM", dict(hidden_size=32, intermediate_size=64),
            {"q_proj", "k_proj", "v_proj", "fc1", "fc2"}),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(hidden_size=32, intermediate_size=64),
                 {"query_key_value", "dense_h_to_4h", "dense_4h_to_h"}),
    "falcon": ("FalconConfig", "FalconForCausalLM", dict(hidden_size=32), {"query_key_value", "dense_h_to_4h", "dense_4h_to_h"}),
    "bloom": ("BloomConfig", "BloomForCausalLM", dict(hidden_size=32, n_layer=2, n_head=4),
              {"query_key_value", "dense_h_to_4h", "dense_4h_to_h"}),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", dict(hidden_size=32, intermediate_size=64, num_key_value_heads=2),
                   {"q_proj", "k_proj", "v_proj", "c_fc", "c_proj"}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(hidden_size=32, intermediate_size=64, num_key_value_heads=2, pad_token_id=0),
             {"qkv_proj", "gate_up_proj", "down_proj"}),
}


@pytest.mark.parametrize("model_type", sorted(CASES))
def test_default_targets_adapt_the_papers_roles(model_type):
    config_name, model_name, extra, expected = CASES[model_type]
    values = {**TINY, **extra}
    if "n_layer" in values:  # GPT-J / BLOOM spell the sizes their own way
        values.pop("num_hidden_layers"), values.pop("num_attention_heads")
    torch.manual_seed(0)
    base = getattr(transformers, model_name)(getattr(transformers, config_name)(**values)).eval()
    assert base.config.model_type == model_type
    inputs = {"input_ids": torch.randint(1, 96, (2, 7), generator=torch.Generator().manual_seed(0))}
    reference = model_output(base, inputs)
    model = get_peft_model(base, PiCaConfig(rank=4))
    layers = pica_layers(model)
    assert {name.rsplit(".", 1)[-1] for name in layers} == expected
    assert len(layers) == 2 * len(expected)  # every decoder layer
    assert torch.equal(model_output(model, inputs), reference)  # identity at init
