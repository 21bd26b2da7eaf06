"""Tiny random-weight transformers models and helpers shared by the tests."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    ViTConfig,
    ViTForImageClassification,
)

import pica  # noqa: F401  (registers PiCa with peft)

if os.environ.get("PICA_TEST_WITHOUT_AVX512BF16") == "1":  # bitsandbytes as on a CPU without AVX512-BF16
    import bitsandbytes.functional
    import bitsandbytes.nn.modules

    bitsandbytes.functional.has_avx512bf16 = bitsandbytes.nn.modules.has_avx512bf16 = lambda: False
from pica.tuner.layer import PiCaLayer

torch.set_num_threads(min(2, torch.get_num_threads()))


def llama_config(**overrides) -> LlamaConfig:
    values = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    values.update(overrides)
    return LlamaConfig(**values)


def make_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(**overrides)).eval()


def make_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()


def make_bert_classifier(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, num_labels=3)
    return BertForSequenceClassification(config).eval()


def make_vit(seed: int = 0) -> ViTForImageClassification:
    torch.manual_seed(seed)
    config = ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=64, num_labels=4)
    return ViTForImageClassification(config).eval()


MODEL_FACTORIES = {"llama": make_llama, "gpt2": make_gpt2, "bert": make_bert_classifier, "vit": make_vit}


def example_inputs(kind: str, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    if kind == "vit":
        return {"pixel_values": torch.randn(2, 3, 16, 16, generator=generator)}
    return {"input_ids": torch.randint(1, 96, (2, 7), generator=generator)}


def model_output(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def randomize_updates(model: nn.Module, seed: int = 0, scale: float = 0.1) -> None:
    """Give every (shared) M random values, once per distinct tensor."""
    generator = torch.Generator().manual_seed(seed)
    for name, update in model.named_parameters():
        if ".pica_M." in name:
            with torch.no_grad():
                update.copy_(torch.randn(update.shape, generator=generator) * scale)


def pica_layers(model: nn.Module) -> dict[str, PiCaLayer]:
    return {name: module for name, module in model.named_modules() if isinstance(module, PiCaLayer)}


def update_ids_by_group(model: nn.Module, adapter: str = "default") -> dict[str, set[int]]:
    """Group key → ids of the M tensors its layers use (a shared group has exactly one)."""
    groups: dict[str, set[int]] = {}
    for layer in pica_layers(model).values():
        groups.setdefault(layer.pica_group[adapter], set()).add(id(layer.get_update(adapter)))
    return groups


@pytest.fixture(params=sorted(MODEL_FACTORIES))
def model_kind(request) -> str:
    return request.param


TINY_WORDS = ("the a an is was are of to and in on for with cat dog bird fish tree sun moon star red blue green "
              "big small run jump sit eat see one two three four five six seven eight nine ten yes no what how "
              "many answer question ### : . , ? !").split()


def make_tokenizer():
    """A word-level fast tokenizer built offline; ids fit the tiny models' vocabulary of 96."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {token: index for index, token in enumerate(specials + list(dict.fromkeys(TINY_WORDS)))}
    assert len(vocab) <= 96
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>")
