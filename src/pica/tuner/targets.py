"""Default ``target_modules`` per transformers ``model_type`` (used when the config gives none).

Decoders follow the paper (q, k, v, up, down projections). Encoders target the attention
projections and the three dense layers of each block, and never the pooler.
"""

from __future__ import annotations

__all__ = ["DEFAULT_TARGET_MODULES"]

_DECODER = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
_BERT_LIKE = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
_VIT = ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2", *_BERT_LIKE]
_DEBERTA = ["query_proj", "key_proj", "value_proj", "attention.output.dense", "intermediate.dense", "output.dense"]

DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    **{
        model_type: _DECODER
        for model_type in (
            "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
            "gemma3_text", "olmo", "olmo2", "smollm3", "granite", "cohere",
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
}
