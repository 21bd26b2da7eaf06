"""Tiny Llama checkpoints loaded quantised by bitsandbytes on the CPU (skips where bitsandbytes is missing)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import make_llama

bnb = pytest.importorskip("bitsandbytes")

SCHEMES = ("nf4", "fp4", "int8")
"""Quantisations under test: bitsandbytes 4-bit NormalFloat and float, and 8-bit row-wise int8."""


def save_llama(directory: Path, seed: int = 0) -> Path:
    """Save the conftest tiny Llama (fp32, random weights) to ``directory``."""
    make_llama(seed).save_pretrained(directory)
    return directory


def quantization_config(scheme: str, compute_dtype: torch.dtype = torch.float32):
    from transformers import BitsAndBytesConfig

    if scheme == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=scheme, bnb_4bit_compute_dtype=compute_dtype)


def load_quantized(directory: Path, scheme: str = "nf4", compute_dtype: torch.dtype = torch.float32):
    """The checkpoint in ``directory`` loaded with bitsandbytes ``scheme`` on the CPU, in eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, quantization_config=quantization_config(scheme, compute_dtype),
                                                device_map="cpu").eval()
