"""Offline helpers for the generative-task tests: a tiny byte-level BPE tokenizer, a tiny random Llama,
and a fake model whose ``generate`` returns chosen text (to test scoring end to end)."""

from __future__ import annotations

import copy
import functools

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CORPUS = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction: ### Input: ### Response: Let's think step by step.",
    "Natalia sold 48/2 = 24 clips in May. Natalia sold 48+24 = 72 clips altogether. #### 72",
    "The answer is: 18. the correct answer is true false solution1 answer2 ending3 option1",
    "Janet sells 16 - 3 - 4 = 9 duck eggs a day. She makes 9 * 2 = $18 every day.",
]


@functools.lru_cache(maxsize=1)
def _bpe_tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(CORPUS, trainer)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", backend.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                   padding_side="right")


def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A fresh copy of a causal-LM style tokenizer: byte-level BPE (any text encodes, decoding is exact),
    BOS ``<s>`` prepended by its post-processor, EOS ``</s>``, no pad token, right padding."""
    return copy.deepcopy(_bpe_tokenizer())


def tiny_llama(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer random LlamaForCausalLM for ``vocab_size`` tokens (bos 0, eos 1, no pad)."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=0, eos_token_id=1)
    return LlamaForCausalLM(config).eval()


class ScriptedModel(torch.nn.Module):
    """Stands in for a causal LM: ``generate`` appends the scripted reply of each prompt (looked up by the
    decoded prompt text), then EOS and padding, and records the calls for inspection."""

    def __init__(self, tokenizer, replies: dict[str, str]):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.tokenizer = tokenizer
        self.replies = replies
        self.calls: list[dict] = []

    def generate(self, input_ids, attention_mask, generation_config):
        self.calls.append({"input_ids": input_ids.clone(), "attention_mask": attention_mask.clone(),
                           "config": generation_config, "padding_side": self.tokenizer.padding_side,
                           "training": self.training})
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            prompt = self.tokenizer.decode(ids[mask.bool()], skip_special_tokens=True)
            reply = self.tokenizer(self.replies[prompt], add_special_tokens=False)["input_ids"]
            rows.append(reply[: generation_config.max_new_tokens - 1] + [self.tokenizer.eos_token_id])
        width = max(map(len, rows))
        pad = generation_config.pad_token_id
        new = torch.tensor([row + [pad] * (width - len(row)) for row in rows])  # (batch, new)
        return torch.cat([input_ids, new], dim=1)  # (batch, prompt_len + new)
