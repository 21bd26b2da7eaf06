"""Image classification (``--task image-classify``): a ViT / DeiT / DINOv2 with a new head.

Data (``train_data`` / ``eval_data``): a folder per class, a CSV / JSONL / JSON list of image paths
and labels, or a ``datasets`` source ``NAME[:CONFIG][@SPLIT]`` (see :mod:`pica.recipes.images`).
The model is loaded with ``AutoModelForImageClassification`` and its new head (``classifier``) is
trained in full by every method (``modules_to_save``), as for the text classifier; pixels come from
the model's ``AutoImageProcessor``. Metrics: accuracy, F1 (binary: of the second label; else macro),
Matthews correlation (the text classifier's :func:`~pica.recipes.tasks.classify.compute_metrics`).

Options (``task_options``): ``size`` (resize every image to size × size pixels, no crop; default:
the processor's own setting), ``mode`` (PIL mode every image is converted to, ``"RGB"`` (default) or
``"L"``; ``null`` keeps images as they are and requires one mode for all), ``image_field`` (the
image column; default: detected), ``label_field`` (``"label"``), ``labels`` (class names in id
order; default: sorted distinct training labels), ``metric`` (headline metric, ``accuracy``),
``encoding`` (CSV/JSONL text encoding). ``problem`` and ``num_labels`` are filled in (always a
single-label classification).
"""

from __future__ import annotations

import os
from typing import Any, Optional

import numpy as np
import torch
from datasets import Array3D, Dataset, Features, Value
from transformers import default_data_collator

from ..batching import batch_starts, eval_mode
from ..images import MODES, load_image_processor, pixel_array, read_image_examples
from .classify import CLASSIFICATION_METRICS, compute_metrics, label_indices

__all__ = ["MODALITY", "OPTIONS", "TASK_KIND", "build_train_dataset", "check_eval_examples", "compute_metrics",
           "data_collator", "describe", "evaluate", "infer_options", "load_examples", "load_processor"]

TASK_KIND = "classification"
MODALITY = "image"
"""Loaded with ``AutoModelForImageClassification``; peft wraps it without a text task type."""

OPTIONS = ("size", "mode", "image_field", "label_field", "labels", "metric", "encoding", "problem", "num_labels")


def _check_options(options: dict[str, Any]) -> None:
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"image-classify: unknown task option(s) {unknown}; known: {list(OPTIONS)}")
    if options.get("problem") not in (None, "classification"):
        raise ValueError(f"image-classify: problem must be 'classification', got {options['problem']!r}")
    if "mode" in options and options["mode"] is not None and options["mode"] not in MODES:
        raise ValueError(f"image-classify: task option mode must be one of {sorted(MODES)} or null, "
                         f"got {options['mode']!r}")
    size = options.get("size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ValueError(f"image-classify: task option size must be a positive integer (pixels), got {size!r}")
    if options.get("metric") not in (None, *CLASSIFICATION_METRICS):
        raise ValueError(f"image-classify: metric must be one of {list(CLASSIFICATION_METRICS)}, "
                         f"got {options['metric']!r}")


def load_examples(source: str | os.PathLike, *, limit: Optional[int] = None, **options: Any) -> list[dict]:
    """Read and check labelled images; a bad image or row raises ``ValueError`` naming file and row."""
    _check_options(options)
    return read_image_examples(source, options, limit)


def infer_options(train_examples: list[dict], options: dict[str, Any]) -> dict[str, Any]:
    """Fill ``problem`` (classification), ``labels`` (sorted distinct training labels unless given),
    ``num_labels`` and ``metric``."""
    _check_options(options)
    options = dict(options)
    options["problem"] = "classification"
    if options.get("labels") is None:
        options["labels"] = sorted({e["label"] for e in train_examples}, key=lambda v: (isinstance(v, str), v))
    if len(options["labels"]) < 2:
        raise ValueError(f"image-classify: need at least 2 classes, got labels {options['labels']}")
    options["num_labels"] = len(options["labels"])
    options.setdefault("metric", "accuracy")
    return options


def _targets(examples: list[dict], options: dict[str, Any]) -> list[int]:
    if options.get("labels") is None:
        options = infer_options(examples, options)
    return label_indices(examples, options["labels"],
                         lambda _, example: f"{example['location']}: label {example['label']!r} of image "
                                            f"{example['image']} is not among the training labels {options['labels']}")


def check_eval_examples(examples: list[dict], options: dict[str, Any]) -> None:
    """Refuse eval images whose label the trained head cannot predict (naming the file and row)."""
    _targets(examples, options)


def load_processor(source: str, options: dict[str, Any]):
    """The model's image processor, resizing to ``options["size"]`` if set."""
    _check_options(options)
    return load_image_processor(source, options.get("size"))


def data_collator(processor: Any):
    """Stacks ``pixel_values`` and ``labels`` (every image was processed to one shape)."""
    return default_data_collator


def _pixels(examples: list[dict], processor: Any, options: dict[str, Any]) -> np.ndarray:
    """``(images, channels, height, width)`` float32; a shape unlike the first image's names the file and row."""
    arrays: list[np.ndarray] = []
    for example in examples:
        array = pixel_array(example, processor, options.get("mode", "RGB"))
        if arrays and array.shape != arrays[0].shape:
            raise ValueError(f"{example['location']}: image {example['image']} was processed to shape "
                             f"{tuple(array.shape)}, but {examples[0]['image']} to {tuple(arrays[0].shape)}: the "
                             "images have mixed sizes and the image processor does not resize them to one size; set "
                             "task option size")
        arrays.append(array)
    return np.stack(arrays)


def build_train_dataset(examples: list[dict], processor: Any, *, max_length: Optional[int] = None,
                        **options: Any) -> Dataset:
    """``pixel_values`` ``(channels, height, width)`` and ``labels`` (class id) per image, as torch tensors.

    ``max_length`` is accepted for the harness's uniform call and has no meaning for images.
    """
    _check_options(options)
    targets = _targets(examples, options)
    pixels = _pixels(examples, processor, options)  # (images, channels, height, width)
    features = Features({"pixel_values": Array3D(pixels.shape[1:], "float32"), "labels": Value("int64")})
    return Dataset.from_dict({"pixel_values": pixels, "labels": targets}, features=features).with_format("torch")


def describe(example: dict) -> dict[str, Any]:
    """What a prediction record shows of the example: the image's file or ``source[index]``."""
    return {"image": example["image"]}


def evaluate(model, processor, examples: list[dict], *, batch_size: int = 32, progress: bool = True,
             max_length: Optional[int] = None, max_new_tokens: Optional[int] = None, **options: Any) -> dict:
    """Batched forward passes; returns ``{"metrics": {...}, "predictions": [...]}``.

    ``max_length`` / ``max_new_tokens`` are accepted for the harness's uniform call (text settings).
    """
    _check_options(options)
    if options.get("labels") is None:
        options = infer_options(examples, options)
    targets = np.asarray(_targets(examples, options))
    pixels = _pixels(examples, processor, options)  # (images, channels, height, width)
    device = next(model.parameters()).device
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    outputs: list[np.ndarray] = []
    with eval_mode(model), torch.no_grad():
        for start in batch_starts(len(examples), batch_size, progress):
            batch = torch.from_numpy(pixels[start:start + batch_size]).to(device=device, dtype=dtype)
            outputs.append(model(pixel_values=batch).logits.float().cpu().numpy())
    predicted = np.concatenate(outputs).argmax(axis=-1)
    metrics = compute_metrics(targets, predicted, "classification", options["num_labels"])
    labels = options["labels"]
    predictions = [{**describe(e), "target": e["label"], "prediction": labels[p], "correct": bool(labels[p] == e["label"])}
                   for e, p in zip(examples, predicted)]
    return {"metrics": metrics, "predictions": predictions}
