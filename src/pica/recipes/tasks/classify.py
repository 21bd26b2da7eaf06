"""GLUE-style sentence / sentence-pair classification and regression.

Rows (JSONL, JSON list, CSV, or a ``datasets`` source ``NAME[:CONFIG][@SPLIT]``) have one or two
text fields and a label. Canonical example: ``{"text": str, "text_pair": str | None, "label":
int | float | str}``. Metrics (scikit-learn / scipy): accuracy, F1 (binary: of the second label;
else macro), Matthews correlation for classification; Pearson and Spearman for regression.

Options (``task_options`` in a recipe): ``text_fields`` (one or two column names; default: detected
from the first row), ``label_field`` (``"label"``), ``labels`` (class names in id order; default:
sorted distinct training labels), ``problem`` (``"classification"``/``"regression"``; default:
regression iff the labels are numbers and some are not integers), ``metric`` (headline metric),
``encoding`` (text files, default utf-8).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from datasets import Dataset
from transformers import DataCollatorWithPadding

from ..batching import batch_starts, eval_mode
from ..data_files import DATA_SUFFIXES, iter_rows, load_datasets_source

TASK_KIND = "classification"

OPTIONS = ("text_fields", "label_field", "labels", "problem", "metric", "encoding", "num_labels")
_TEXT_FIELD_CANDIDATES = (("sentence1", "sentence2"), ("question1", "question2"), ("premise", "hypothesis"),
                          ("question", "sentence"), ("sentence",), ("text",))
_INT = re.compile(r"-?\d+")
CLASSIFICATION_METRICS = ("accuracy", "f1", "matthews")
REGRESSION_METRICS = ("pearson", "spearman")


def _check_options(options: dict[str, Any]) -> None:
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"classify: unknown task option(s) {unknown}; known: {list(OPTIONS)}")
    if options.get("problem") not in (None, "classification", "regression"):
        raise ValueError(f"classify: problem must be 'classification' or 'regression', got {options['problem']!r}")


def _label(value: Any, location: str, field: str) -> int | float | str:
    if isinstance(value, bool):
        raise ValueError(f"{location}: label field {field!r} is a JSON boolean ({str(value).lower()}); write the "
                         "labels as class names or integers (e.g. \"yes\"/\"no\" or 1/0)")
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ValueError(f"{location}: missing or empty label field {field!r}")
    if isinstance(value, (int, float)):
        if not np.isfinite(value):
            raise ValueError(f"{location}: label field {field!r} is not finite: {value!r}")
        return value
    if not isinstance(value, str):
        raise ValueError(f"{location}: label field {field!r} must be a string or number, got {value!r}")
    value = value.strip()
    if _INT.fullmatch(value):
        return int(value)
    try:
        number = float(value)
    except ValueError:
        return value
    return number if np.isfinite(number) else value


def _rows(source: str | os.PathLike, encoding: str):
    path = Path(source)
    if path.exists() or path.suffix.lower() in DATA_SUFFIXES:
        yield from iter_rows(path, encoding=encoding)
        return
    data = load_datasets_source(str(source), f"classify: cannot load {str(source)!r} as a file or")
    for index, row in enumerate(data):
        yield f"{source}[{index}]", row


def load_examples(source: str | os.PathLike, *, limit: Optional[int] = None, **options: Any) -> list[dict]:
    """Read and validate rows; a bad row raises ``ValueError`` naming file and line and the field."""
    _check_options(options)
    label_field = options.get("label_field", "label")
    fields = options.get("text_fields")
    if isinstance(fields, str):
        fields = [fields]
    examples: list[dict] = []
    for location, row in _rows(source, options.get("encoding", "utf-8")):
        if limit is not None and len(examples) >= limit:
            break
        if fields is None:
            fields = next((list(c) for c in _TEXT_FIELD_CANDIDATES if all(k in row for k in c)), None)
            if fields is None:
                raise ValueError(f"{location}: no text column found among {sorted(row)}; set task option text_fields")
        texts = []
        for name in fields:
            value = row.get(name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{location}: missing or empty text field {name!r}")
            texts.append(value)
        if label_field not in row:
            raise ValueError(f"{location}: missing label field {label_field!r}")
        examples.append({"text": texts[0], "text_pair": texts[1] if len(texts) > 1 else None,
                         "label": _label(row[label_field], location, label_field)})
    if not examples:
        raise ValueError(f"classify: no examples in {source}")
    return examples


def infer_options(train_examples: list[dict], options: dict[str, Any]) -> dict[str, Any]:
    """Fill ``problem``, ``labels``, ``num_labels`` and ``metric`` from the training examples."""
    _check_options(options)
    options = dict(options)
    values = [example["label"] for example in train_examples]
    numeric = all(isinstance(v, (int, float)) for v in values)
    if options.get("problem") is None:
        options["problem"] = "regression" if numeric and any(float(v) != int(v) for v in values) else "classification"
    if options["problem"] == "regression":
        if not numeric:
            raise ValueError("classify: regression needs numeric labels")
        options.update(labels=None, num_labels=1)
        options.setdefault("metric", "pearson")
    else:
        if options.get("labels") is None:
            options["labels"] = sorted(set(values), key=lambda v: (isinstance(v, str), v))
        if len(options["labels"]) < 2:
            raise ValueError(f"classify: need at least 2 classes, got labels {options['labels']}")
        options["num_labels"] = len(options["labels"])
        options.setdefault("metric", "accuracy")
    return options


def _targets(examples: list[dict], options: dict[str, Any]) -> list[int | float]:
    if options.get("problem") is None or (options["problem"] == "classification" and options.get("labels") is None):
        options = infer_options(examples, options)
    if options["problem"] == "regression":
        return [float(example["label"]) for example in examples]
    return label_indices(examples, options["labels"],
                         lambda number, example: f"classify: label {example['label']!r} of example {number} is not "
                                                 f"among labels {options['labels']}")


def label_indices(examples: list[dict], labels: list, unknown: Callable[[int, dict], str]) -> list[int]:
    """The index in ``labels`` of each example's ``"label"``.

    Raises:
        ValueError: ``unknown(number, example)`` for the first example whose label is not in ``labels``.
    """
    index = {label: i for i, label in enumerate(labels)}
    for number, example in enumerate(examples):
        if example["label"] not in index:
            raise ValueError(unknown(number, example))
    return [index[example["label"]] for example in examples]


def check_eval_examples(examples: list[dict], options: dict[str, Any]) -> None:
    """Refuse eval examples whose label the trained head cannot predict (before any training).

    Raises:
        ValueError: naming the first such example and the labels.
    """
    _targets(examples, options)


def _tokenize(examples: list[dict], tokenizer, max_length: int) -> dict[str, list]:
    pairs = [example["text_pair"] for example in examples]
    texts = [example["text"] for example in examples]
    return tokenizer(texts, pairs if any(p is not None for p in pairs) else None, truncation=True,
                     max_length=max_length)


def build_train_dataset(examples: list[dict], tokenizer, *, max_length: int, **options: Any) -> Dataset:
    """Unpadded ``input_ids``/``attention_mask`` (+ ``token_type_ids``) and ``labels`` (id or float)."""
    _check_options(options)
    columns = dict(_tokenize(examples, tokenizer, max_length))
    columns["labels"] = _targets(examples, options)
    return Dataset.from_dict(columns)


def compute_metrics(targets: np.ndarray, predictions: np.ndarray, problem: str, num_labels: int) -> dict[str, float]:
    """Classification: accuracy, F1, Matthews; regression: Pearson, Spearman."""
    if problem == "regression":
        from scipy.stats import pearsonr, spearmanr

        constant = np.ptp(targets) == 0 or np.ptp(predictions) == 0
        return {"pearson": float("nan") if constant else float(pearsonr(predictions, targets)[0]),
                "spearman": float("nan") if constant else float(spearmanr(predictions, targets)[0])}
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    average = "binary" if num_labels == 2 else "macro"
    return {"accuracy": float(accuracy_score(targets, predictions)),
            "f1": float(f1_score(targets, predictions, average=average, labels=list(range(num_labels)),
                                 zero_division=0)),
            "matthews": float(matthews_corrcoef(targets, predictions))}


def evaluate(model, tokenizer, examples: list[dict], *, batch_size: int = 32, max_length: int = 512,
             progress: bool = True, max_new_tokens: Optional[int] = None, **options: Any) -> dict:
    """Batched forward passes; returns ``{"metrics": {...}, "predictions": [...]}``."""
    _check_options(options)
    if options.get("problem") is None or (options["problem"] == "classification" and options.get("labels") is None):
        options = infer_options(examples, options)
    targets = np.asarray(_targets(examples, options))
    collate = DataCollatorWithPadding(tokenizer)
    encoded = _tokenize(examples, tokenizer, max_length)
    rows = [{key: values[i] for key, values in encoded.items()} for i in range(len(examples))]
    device = next(model.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))  # batches of similar length
    outputs: list[np.ndarray] = []
    with eval_mode(model), torch.no_grad():
        for start in batch_starts(len(rows), batch_size, progress):
            batch = collate([rows[i] for i in order[start:start + batch_size]])
            outputs.append(model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu().numpy())
    logits = np.empty((len(rows), outputs[0].shape[1]), dtype=np.float32)
    logits[order] = np.concatenate(outputs)
    if options["problem"] == "regression":
        predicted = logits[:, 0]
        metrics = compute_metrics(targets, predicted, "regression", 1)
        shown = predicted.tolist()
    else:
        predicted = logits.argmax(axis=-1)
        metrics = compute_metrics(targets, predicted, "classification", options["num_labels"])
        shown = [options["labels"][i] for i in predicted]
    predictions = [{"text": e["text"], "text_pair": e["text_pair"], "target": e["label"], "prediction": p,
                    "correct": bool(p == e["label"]) if options["problem"] == "classification" else None}
                   for e, p in zip(examples, shown)]
    return {"metrics": metrics, "predictions": predictions}
