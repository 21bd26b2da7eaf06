"""Local stand-ins for the Hub models that peft's ``test_decoder_models.py`` names (the run is offline).

Each stand-in is a tiny random model of the same architecture (the same transformers model class and
``model_type``, hence the same module names and PiCa's default targets), built from a transformers config
with a fixed seed and saved with ``save_pretrained`` under ``<root>/<org>/<name>``, so that the local path
ends with the Hub id: peft's tests that look at the id (``"GPT2LMHeadModel" in model_id``, ``"qwen2" in
model_id``, ...) see what they would see online. Sizes are small (hidden 16-32, 2 layers) and every
adapted matrix has ``min(in, out) ≥ 4``, the PiCa row's rank. They are not the Hub checkpoints: weights and
some sizes differ, which no test relies on (peft's tests compare a model with itself).

``python -m pica_conformance.standins ROOT`` builds the missing ones and prints ROOT.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["STANDINS", "VERSION", "build", "local_path"]

VERSION = 1  # bump when a config below changes: the cache directory name includes it

_VOCAB = 1000


def _opt() -> Any:
    from transformers import OPTConfig

    # fc1/fc2 are 16 -> 4 -> 16 as in the Hub's tiny OPT (peft's tests mention that size)
    return OPTConfig(vocab_size=_VOCAB, hidden_size=16, ffn_dim=4, num_hidden_layers=2, num_attention_heads=4,
                     word_embed_proj_dim=16, max_position_embeddings=64)


def _gpt2() -> Any:
    from transformers import GPT2Config

    return GPT2Config(vocab_size=_VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=_VOCAB - 1,
                      eos_token_id=_VOCAB - 1)


def _gptj() -> Any:
    from transformers import GPTJConfig

    return GPTJConfig(vocab_size=_VOCAB, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=64,
                      bos_token_id=_VOCAB - 1, eos_token_id=_VOCAB - 1)


def _llama() -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=_VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def _qwen2() -> Any:
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=_VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def _gemma3() -> Any:
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(vocab_size=_VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                            sliding_window=8)


# Hub id (as peft's tests name it) -> transformers config of the same architecture
STANDINS: dict[str, Callable[[], Any]] = {
    "peft-internal-testing/tiny-random-OPTForCausalLM": _opt,
    "peft-internal-testing/tiny-random-GPT2LMHeadModel": _gpt2,
    "peft-internal-testing/tiny-random-GPTJForCausalLM": _gptj,
    "trl-internal-testing/tiny-random-LlamaForCausalLM": _llama,
    "peft-internal-testing/tiny-dummy-qwen2": _qwen2,
    "hf-internal-testing/tiny-random-Gemma3ForCausalLM": _gemma3,
}


def local_path(root: str | os.PathLike, model_id: str) -> str:
    """Where the stand-in of ``model_id`` lives under ``root`` (it ends with the Hub id)."""
    return str(Path(root) / model_id)


def build(root: str | os.PathLike) -> dict[str, str]:
    """Build every missing stand-in under ``root``; return Hub id -> local path.

    Each is written to a temporary directory and renamed into place, so an interrupted build leaves
    nothing that looks complete.
    """
    import torch
    from transformers import AutoModelForCausalLM

    paths = {}
    for model_id, make_config in STANDINS.items():
        path = Path(local_path(root, model_id))
        paths[model_id] = str(path)
        if (path / "config.json").is_file():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(make_config())
        model.save_pretrained(partial)
        shutil.rmtree(path, ignore_errors=True)
        partial.rename(path)
    return paths


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m pica_conformance.standins ROOT")
    build(sys.argv[1])
    print(sys.argv[1])
