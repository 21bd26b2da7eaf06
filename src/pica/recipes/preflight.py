"""Checks of a whole comparison before its first training step: everything that depends only on the
recipe, the data and the model's *shapes*.

Each method is applied to a weightless copy of the base model (built from its config on the ``meta``
device: no weights are read, so this costs milliseconds even for a 70B model): task head, targets,
ranks, group shapes, layer types and the peft config of every method are checked as the real run will
check them, so a mistake in the third method of a comparison is reported before the first one trains.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import nn
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForImageClassification,
                          AutoModelForSequenceClassification)

from .config import RecipeConfig, RecipeError
from .heads import head_modules
from .methods import apply_method
from .models import model_source, quantization_kwargs
from .prepared import PreparedRun
from .tasks import task_modality

logger = logging.getLogger(__name__)

__all__ = ["check_before_training", "weightless_model"]

_NOTHING_TRAINED = "(found before training; nothing was trained)"


def weightless_model(recipe: RecipeConfig, task_kind: str, options: dict[str, Any], modality: str = "text") -> nn.Module:
    """The base model of ``recipe`` with every tensor on the ``meta`` device (architecture and shapes only)."""
    source, extra = model_source(recipe.model, recipe.gguf_file)
    config = AutoConfig.from_pretrained(source, **extra)
    if task_kind == "classification":
        config.num_labels = options.get("num_labels") or config.num_labels
        config.problem_type = ("regression" if options.get("problem") == "regression"
                               else "single_label_classification")
    auto = (AutoModelForCausalLM if task_kind == "generative" else
            AutoModelForImageClassification if modality == "image" else AutoModelForSequenceClassification)
    with torch.device("meta"):
        return auto.from_config(config)


def check_before_training(prepared: PreparedRun) -> None:
    """Raise on anything that would make a later run of the comparison fail for a reason known now.

    Checks the eval examples against the task's options (e.g. a label outside the training labels) and,
    for every resolved method (:attr:`PreparedRun.methods`), the method applied to a weightless copy of
    the model; ``quantize`` needs bitsandbytes.

    Raises:
        RecipeError: naming the method and what is wrong.
        ValueError: from the task's own check of the eval examples (naming the example).
    """
    task, options, kind, modality = prepared.task, prepared.options, prepared.task_kind, task_modality(prepared.task)
    if hasattr(task, "check_eval_examples"):
        task.check_eval_examples(prepared.eval_examples, options)
    for planned in prepared.methods.values():  # quantize with full/probe/pissa is refused by RecipeConfig itself
        try:
            quantization_kwargs(planned.recipe.quantize, planned.recipe.dtype)
        except ImportError as error:
            raise RecipeError(f"method {planned.method}: {error} {_NOTHING_TRAINED}") from error
    try:
        base = weightless_model(prepared.recipe, kind, options, modality)
    except Exception as error:  # noqa: BLE001  (an architecture that cannot be built without weights)
        logger.info("pre-flight check of the methods skipped: cannot build %s without weights (%s)",
                    prepared.recipe.model, error)
        return
    for planned in prepared.trained_methods():  # features applies no method
        recipe, model = planned.recipe, copy.deepcopy(base)
        try:
            heads = head_modules(model, kind, recipe.head_modules)
            apply_method(model, planned.method, recipe, kind, heads, weightless=True, modality=modality)
        except (NotImplementedError, RuntimeError) as error:  # an operation without weights: the run checks it
            logger.info("pre-flight check of %s stopped at an operation that needs weights: %s", planned.method,
                        error)
        except (ValueError, TypeError, KeyError) as error:
            raise RecipeError(f"method {planned.method}: {error} {_NOTHING_TRAINED}") from error
