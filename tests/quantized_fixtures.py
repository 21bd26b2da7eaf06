"""Tiny Llama checkpoints loaded quantised by bitsandbytes on the CPU (skips where bitsandbytes is missing).

bitsandbytes keeps a 4-bit weight in one of two layouts on the CPU: the layout it quantises into, and,
on CPUs with AVX512-BF16, the layout of its CPU kernel, into which it repacks a layer in place on the
layer's first inference forward. The ``bnb_layout`` fixture runs a test module in both: ``"unpacked"``
(packing switched off, as on CPUs without AVX512-BF16) and ``"packed"`` (bitsandbytes's own forward packs
every 4-bit layer; only where bitsandbytes has that kernel, i.e. ``has_avx512bf16()``: elsewhere
``tests/tuner/test_quantized_layouts.py`` packs weights directly and checks pica's reader on them).
Either way the model has answered one request before the test uses it, as a served base has.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import make_llama

bnb = pytest.importorskip("bitsandbytes")

SCHEMES = ("nf4", "fp4", "int8")
"""Quantisations under test: bitsandbytes 4-bit NormalFloat and float, and 8-bit row-wise int8."""
LAYOUTS = ("unpacked", "packed")
HAS_PACKED_KERNEL = bool(bnb.functional.has_avx512bf16())
"""Whether bitsandbytes registered its CPU-packed 4-bit kernel on this host (AVX512-BF16)."""
PACKABLE = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
"""Llama sizes bitsandbytes can pack: in_features a multiple of the 64-value block, out_features of 32."""
_LAYOUT = {"current": "unpacked"}


@pytest.fixture(params=LAYOUTS)
def bnb_layout(request):
    """Run the test with every 4-bit layer in the given layout (see the module docstring)."""
    if request.param == "packed" and not HAS_PACKED_KERNEL:
        pytest.skip("no AVX512-BF16 here: bitsandbytes has no CPU-packed kernel to run (the reader is tested on "
                    "directly packed weights in test_quantized_layouts.py)")
    _LAYOUT["current"] = request.param
    yield request.param
    _LAYOUT["current"] = "unpacked"


def save_llama(directory: Path, seed: int = 0) -> Path:
    """Save a tiny Llama of :data:`PACKABLE` sizes (fp32, random weights) to ``directory``."""
    make_llama(seed, **PACKABLE).save_pretrained(directory)
    return directory


def quantization_config(scheme: str, compute_dtype: torch.dtype = torch.float32, **extra):
    from transformers import BitsAndBytesConfig

    if scheme == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, **extra)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=scheme, bnb_4bit_compute_dtype=compute_dtype,
                              **extra)


def set_layout(model, layout: str) -> None:
    """Let bitsandbytes pack the model's 4-bit layers (``"packed"``) or never (``"unpacked"``), then answer one request."""
    four_bit = [module for module in model.modules() if isinstance(module, bnb.nn.Linear4bit)]
    if layout == "packed" and not four_bit:
        pytest.skip("8-bit layers have one layout: the unpacked run covers them")
    for module in four_bit:
        module.support_avx512bf16_for_cpu = layout == "packed"
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))
    if layout == "packed":
        assert all(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in four_bit), \
            "bitsandbytes did not pack the 4-bit layers"


def load_quantized(directory: Path, scheme: str = "nf4", compute_dtype: torch.dtype = torch.float32,
                   layout: str | None = None, **extra):
    """The checkpoint in ``directory`` loaded with bitsandbytes ``scheme`` on the CPU, in eval mode, in
    ``layout`` (default: the ``bnb_layout`` fixture's), after one answered request; ``extra``: more
    ``BitsAndBytesConfig`` arguments."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, quantization_config=quantization_config(
        scheme, compute_dtype, **extra), device_map="cpu").eval()
    set_layout(model, layout or _LAYOUT["current"])
    return model
