"""GGUF checkpoints → plain, trainable transformers checkpoints (de-quantised once, cached).

transformers can read a ``.gguf`` file (``from_pretrained(folder, gguf_file=name)``): it de-quantises
every tensor to float32, but the model it returns still carries a ``GgufConfig`` quantisation config
and an ``hf_quantizer``, and transformers ``Trainer`` refuses to fine-tune it, with or without a PiCa or
LoRA adapter attached ("quantized with QuantizationMethod.GGUF but that quantization method do not
support training"; transformers 5.x). Here the de-quantised
state dict is loaded into a freshly built model of the same architecture with the quantisation config
removed (a plain ``LlamaForCausalLM`` for a Llama GGUF), checked key by key, and saved as safetensors
with the tokenizer read from the same GGUF. The result is cached under :func:`default_cache_dir`, keyed
by the file's SHA-256, so a GGUF is converted once per machine and every later run loads the cached
directory with ``from_pretrained`` (fast, no GGUF code involved).

Layout of a cached checkpoint: ``<cache>/<gguf stem>-<sha256[:16]>/`` with ``config.json``,
``model.safetensors`` (float32), ``generation_config.json`` if any, the tokenizer files and
``pica_gguf.json`` (source path, size, SHA-256, versions). The directory is written atomically
(:func:`pica.io.atomic_directory`), so a killed conversion leaves no half-written cache entry.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from .conversion_cache import CACHE_ENV, cache_entry, cache_root, file_sha256, valid_entry, write_entry

logger = logging.getLogger(__name__)

__all__ = ["CACHE_ENV", "MARKER_FILE", "default_cache_dir", "dequantized_checkpoint", "file_sha256",
           "rebuild_plain_model"]


MARKER_FILE = "pica_gguf.json"
"""Written last into a converted checkpoint: where it came from (its presence marks a complete entry)."""


def default_cache_dir() -> Path:
    """``$PICA_CACHE_DIR/gguf`` if set, else ``~/.cache/pica/gguf`` (see :mod:`pica.recipes.conversion_cache`)."""
    return cache_root("gguf")


def rebuild_plain_model(loaded: nn.Module) -> nn.Module:
    """A new model of ``loaded``'s class and config, without quantisation config, holding its weights.

    Args:
        loaded: a transformers model as returned by ``from_pretrained(..., gguf_file=...)`` (weights already
            de-quantised, but flagged as quantised through ``config.quantization_config``/``hf_quantizer``).

    Returns:
        The same architecture built from a clean config, float32, in eval mode, with every tensor of
        ``loaded.state_dict()`` copied in (tied weights stay tied).

    Raises:
        ValueError: the rebuilt model's state-dict keys or shapes differ from the loaded ones (names them).
    """
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(loaded.config).from_dict(config_dict)
    state = loaded.state_dict()
    with torch.device("meta"):
        plain = type(loaded)(config)
    expected = plain.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or mismatched:
        raise ValueError(f"cannot rebuild {type(loaded).__name__} from the GGUF weights: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}, shape mismatch {mismatched[:5]}")
    plain.load_state_dict({k: v.detach().to(torch.float32) for k, v in state.items()}, strict=True, assign=True)
    plain.tie_weights()
    # Non-persistent buffers (rotary inverse frequencies) are not in the state dict: rebuild them.
    for name, buffer in loaded.named_buffers():
        module_name, _, buffer_name = name.rpartition(".")
        module = plain.get_submodule(module_name) if module_name else plain
        if buffer_name in getattr(module, "_non_persistent_buffers_set", set()):
            module._buffers[buffer_name] = buffer.detach().clone()
    leftover = [name for name, tensor in [*plain.named_parameters(), *plain.named_buffers()] if tensor.is_meta]
    if leftover:
        raise ValueError(f"cannot rebuild {type(loaded).__name__}: tensors without values {leftover[:5]}")
    if hasattr(plain, "generation_config") and getattr(loaded, "generation_config", None) is not None:
        plain.generation_config = loaded.generation_config
    return plain.eval()


def dequantized_checkpoint(gguf_path: Union[str, os.PathLike], cache_dir: Optional[Union[str, os.PathLike]] = None,
                           *, overwrite: bool = False) -> Path:
    """Directory of a plain float32 safetensors checkpoint (+ tokenizer) of a GGUF causal LM, cached.

    Args:
        gguf_path: the ``.gguf`` file.
        cache_dir: where converted checkpoints live (default :func:`default_cache_dir`).
        overwrite: convert again even if a valid cached entry exists.

    Returns:
        ``<cache_dir>/<stem>-<sha256[:16]>``, loadable with ``AutoModelForCausalLM.from_pretrained`` and
        ``AutoTokenizer.from_pretrained``.

    Raises:
        FileNotFoundError: ``gguf_path`` does not exist.
        ValueError: transformers cannot read the file, or its weights do not fit the architecture it declares
            (the message names the file).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = Path(gguf_path).expanduser().resolve()
    if not source.is_file():
        raise FileNotFoundError(f"GGUF file not found: {source}")
    sha256 = file_sha256(source)
    target = cache_entry("gguf", source, sha256, cache_dir)
    if not overwrite and valid_entry(target, MARKER_FILE, sha256):
        logger.info("GGUF %s: using the de-quantised checkpoint cached in %s", source.name, target)
        return target
    logger.info("GGUF %s: de-quantising into %s (once; later runs reuse it)", source.name, target)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    except Exception as error:  # transformers raises ValueError/KeyError/... for unsupported files
        raise ValueError(f"GGUF {source}: transformers cannot load it as a causal LM: {error}") from error
    try:
        plain = rebuild_plain_model(loaded)
    except ValueError as error:
        raise ValueError(f"GGUF {source}: {error}") from None
    del loaded

    def save(staging: Path) -> None:
        plain.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)

    return write_entry(target, MARKER_FILE, source, sha256, "GGUF cache", save,
                       architecture=type(plain).__name__, dtype="float32")
