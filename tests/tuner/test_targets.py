"""Default targets: each architecture gets PiCa's roles (attention q/k/v, MLP up/down) under its own names."""

from __future__ import annotations

import pytest
import torch
import transformers
from peft import get_peft_model

from pica import PiCaConfig
from tests.conftest import make_llama, model_output, pica_layers

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


MORE = {  # model_type: (config class, model class, extra config, expected leaf names)
    "gpt_neo": ("GPTNeoConfig", "GPTNeoForCausalLM", dict(hidden_size=32, attention_types=[[["global"], 2]],
                                                          intermediate_size=64), {"q_proj", "k_proj", "v_proj", "c_fc", "c_proj"}),
    "codegen": ("CodeGenConfig", "CodeGenForCausalLM", dict(n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=64),
                {"qkv_proj", "fc_in", "fc_out"}),
    "gpt_bigcode": ("GPTBigCodeConfig", "GPTBigCodeForCausalLM", dict(n_embd=32, n_layer=2, n_head=4, n_positions=64),
                    {"c_attn", "c_fc", "c_proj"}),
    "mpt": ("MptConfig", "MptForCausalLM", dict(d_model=32, n_layers=2, n_heads=4), {"Wqkv", "up_proj", "down_proj"}),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", dict(hidden_size=32, intermediate_size=64, num_key_value_heads=2),
                 {"q_proj", "k_proj", "v_proj", "up_proj", "down_proj"}),
    "rwkv": ("RwkvConfig", "RwkvForCausalLM", dict(hidden_size=32, attention_hidden_size=32, intermediate_size=64,
                                                   context_length=64), {"key", "value", "receptance"}),
    "llama4_text": ("Llama4TextConfig", "Llama4ForCausalLM", dict(hidden_size=32, intermediate_size=64,
                    intermediate_size_mlp=64, num_key_value_heads=2, head_dim=8, num_local_experts=2),
                    {"q_proj", "k_proj", "v_proj", "up_proj", "down_proj"}),
    "nemotron_h": ("NemotronHConfig", "NemotronHForCausalLM", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                   num_key_value_heads=2, head_dim=8, hybrid_override_pattern="M*-*"),
                   {"q_proj", "k_proj", "v_proj", "up_proj", "down_proj"}),
    "layoutlm": ("LayoutLMConfig", "LayoutLMForMaskedLM", dict(hidden_size=32, intermediate_size=64),
                 {"query", "key", "value", "dense"}),
}


def _tiny(config_name: str, model_name: str, extra: dict):
    values = {**TINY, **extra}
    for sized in ("n_layer", "n_layers", "d_model"):  # architectures that spell the sizes their own way
        if sized in values:
            values.pop("num_hidden_layers", None), values.pop("num_attention_heads", None)
    torch.manual_seed(0)
    return getattr(transformers, model_name)(getattr(transformers, config_name)(**values)).eval()


@pytest.mark.parametrize("model_type", sorted(MORE))
def test_default_targets_of_more_architectures(model_type):
    base = _tiny(*MORE[model_type][:3])
    assert base.config.model_type == model_type
    inputs = {"input_ids": torch.randint(1, 96, (2, 7), generator=torch.Generator().manual_seed(0))}
    reference = model_output(base, inputs)
    model = get_peft_model(base, PiCaConfig(rank=4))
    layers = pica_layers(model)
    assert {name.rsplit(".", 1)[-1] for name in layers} == MORE[model_type][3]
    assert torch.equal(model_output(model, inputs), reference)  # identity at init


@pytest.mark.parametrize(("config_name", "model_name", "extra", "expected"), [
    ("T5Config", "T5ForConditionalGeneration", dict(d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4,
                                                     decoder_start_token_id=0),
     {"q", "k", "v", "wi", "wo"}),
    ("MT5Config", "MT5ForConditionalGeneration", dict(d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4,
                                                       decoder_start_token_id=0),
     {"q", "k", "v", "wi_0", "wi_1", "wo"}),
    ("BartConfig", "BartForConditionalGeneration", dict(d_model=32, encoder_layers=2, decoder_layers=2,
     encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
     max_position_embeddings=64), {"q_proj", "k_proj", "v_proj", "fc1", "fc2"}),
])
def test_encoder_decoder_models_adapt_encoder_decoder_and_cross_attention(config_name, model_name, extra, expected):
    torch.manual_seed(0)
    base = getattr(transformers, model_name)(getattr(transformers, config_name)(vocab_size=96, **extra)).eval()
    generator = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.randint(3, 96, (2, 7), generator=generator),
              "labels": torch.randint(3, 96, (2, 5), generator=generator)}
    with torch.no_grad():
        reference = base(**inputs).logits
    model = get_peft_model(base, PiCaConfig(rank=4, task_type="SEQ_2_SEQ_LM"))
    layers = pica_layers(model)
    assert {name.rsplit(".", 1)[-1] for name in layers} == expected
    where = {("encoder" if ".encoder." in n else "decoder") + ("-cross" if "EncDecAttention" in n or "encoder_attn" in n
             else "") for n in layers}
    assert where == {"encoder", "decoder", "decoder-cross"}
    groups = {name for name, _ in model.named_parameters() if ".pica_M." in name}
    assert any("EncDecAttention" in g or "encoder_attn" in g for g in groups)  # cross-attention is its own role
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, reference)  # identity at init
    model.train()
    loss = model(**inputs).loss
    loss.backward()
    assert all(p.grad is not None for name, p in model.named_parameters() if ".pica_M." in name and p.requires_grad)


@pytest.mark.parametrize("layer", ["embed_tokens", "conv"])
def test_unsupported_layer_types_are_refused_naming_the_module(layer):
    base = make_llama()
    if layer == "conv":
        base.model.conv = torch.nn.Conv2d(2, 2, 3)
    with pytest.raises(TypeError, match=rf"nn.Linear and transformers Conv1D only; targeted: \['model.{layer} \((Embedding|Conv2d)\)'\]"):
        get_peft_model(base, PiCaConfig(rank=2, target_modules=[layer]))
