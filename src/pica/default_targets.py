"""``DEFAULT_TARGET_MODULES``: PiCa's ``target_modules`` per transformers ``model_type``, used when a config
gives none. Pure Python data.

The rule: PiCa's roles, the paper's choice (the attention query, key and value projections and the
MLP up and down projections; a fused projection such as ``query_key_value`` or ``qkv_proj`` is one
role), under each architecture's own module names, for every model type peft's LoRA mapping lists
(``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``) and a few more. Encoders target the attention
projections and the three dense layers of each block, and never the pooler. Encoder-decoder models
(T5, mT5, BART) adapt the same roles in the encoder, the decoder's self-attention and its
cross-attention (each its own group). Multimodal models adapt their language model only.
"""

from __future__ import annotations

__all__ = ["DEFAULT_TARGET_MODULES"]

_DECODER = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
_BERT_LIKE = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
_VIT = ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2", *_BERT_LIKE]
_T5 = ["q", "k", "v", "wi", "wi_0", "wi_1", "wo"]  # gated T5 (v1.1, mT5) splits wi into wi_0 / wi_1
_DEBERTA = ["query_proj", "key_proj", "value_proj", "attention.output.dense", "intermediate.dense", "output.dense"]

DEFAULT_TARGET_MODULES: dict[str, list[str] | str] = {
    **{
        model_type: _DECODER
        for model_type in (
            "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
            "gemma3_text", "olmo", "olmo2", "smollm3", "granite", "cohere", "stablelm", "llama4_text",
            "gemma4_text", "nemotron_h",
        )
    },
    "gpt2": ["c_attn", "c_fc"],
    **{model_type: _BERT_LIKE for model_type in ("bert", "roberta", "xlm-roberta", "electra")},
    # ViT-style encoders: transformers ≥5 names (q/k/v/o_proj, fc1/fc2) and the older BERT-style names.
    **{model_type: _VIT for model_type in ("vit", "dinov2", "deit")},
    "deberta": ["in_proj", "attention.output.dense", "intermediate.dense", "output.dense"],
    "deberta-v2": _DEBERTA,
    "distilbert": ["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"],
    # Other decoders, same roles (attention q/k/v, MLP up/down) under their own names; fused projections
    # (query_key_value, qkv_proj, gate_up_proj) are one role each.
    **{model_type: ["q_proj", "k_proj", "v_proj", "fc1", "fc2"] for model_type in ("opt", "phi")},
    "gptj": ["q_proj", "k_proj", "v_proj", "fc_in", "fc_out"],
    "starcoder2": ["q_proj", "k_proj", "v_proj", "c_fc", "c_proj"],
    **{model_type: ["query_key_value", "dense_h_to_4h", "dense_4h_to_h"] for model_type in ("gpt_neox", "falcon", "bloom")},
    "phi3": ["qkv_proj", "gate_up_proj", "down_proj"],
    "gpt_neo": ["q_proj", "k_proj", "v_proj", "c_fc", "c_proj"],
    "codegen": ["qkv_proj", "fc_in", "fc_out"],
    "gpt_bigcode": ["c_attn", "mlp.c_fc", "mlp.c_proj"],  # attn.c_proj is the output projection
    "mpt": ["Wqkv", "up_proj", "down_proj"],
    "rwkv": ["attention.key", "attention.value", "attention.receptance", "feed_forward.key", "feed_forward.value"],
    "layoutlm": _BERT_LIKE,
    **{model_type: _T5 for model_type in ("t5", "mt5")},
    "bart": ["q_proj", "k_proj", "v_proj", "fc1", "fc2"],
    # multimodal: the language model only (a regex over the whole module path)
    "llama4": r".*language_model\..*\.(q_proj|k_proj|v_proj|up_proj|down_proj)",
    "gemma4": r".*language_model\..*\.(q_proj|k_proj|v_proj|up_proj|down_proj)",
    "blip-2": r".*language_model\..*\.(q_proj|k_proj|v_proj|fc1|fc2|q|k|v|wi|wi_0|wi_1|wo)",
    # remote-code architectures (not in transformers; names from their published modelling code, untested here)
    **{model_type: ["query_key_value", "dense_h_to_4h", "dense_4h_to_h"]
       for model_type in ("RefinedWeb", "RefinedWebModel", "chatglm")},
    "btlm": ["c_attn", "mlp.c_fc", "mlp.c_fc2", "mlp.c_proj"],
    "rwkv7": ["r_proj", "k_proj", "v_proj", "key", "value"],
}
