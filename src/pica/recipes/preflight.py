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
from .methods import apply_method, default_head_modules
from .models import model_source, quantization_kwargs
from .tasks import task_modality

logger = logging.getLogger(__name__)

__all__ = ["check_before_training", "weightless_model"]


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


def check_before_training(recipe: RecipeConfig, task: Any, options: dict[str, Any],
                          eval_examples: list[dict]) -> None:
    """Raise on anything that would make a later run of ``recipe`` fail for a reason known now.

    Checks the eval examples against the task's options (e.g. a label outside the training labels) and,
    for every method of the recipe (with its ``per_method`` overrides), the method applied to a
    weightless copy of the model; ``quantize`` needs bitsandbytes.

    Raises:
        RecipeError: naming the method and what is wrong.
        ValueError: from the task's own check of the eval examples (naming the example).
    """
    if hasattr(task, "check_eval_examples"):
        task.check_eval_examples(eval_examples, options)
    for method in recipe.methods:  # quantize with full/probe/pissa is refused by RecipeConfig itself
        method_recipe = recipe.for_method(method)
        try:
            quantization_kwargs(method_recipe.quantize, method_recipe.dtype)
        except ImportError as error:
            raise RecipeError(f"method {method}: {error} (found before training; nothing was trained)") from error
    try:
        base = weightless_model(recipe, task.TASK_KIND, options, task_modality(task))
    except Exception as error:  # noqa: BLE001  (an architecture that cannot be built without weights)
        logger.info("pre-flight check of the methods skipped: cannot build %s without weights (%s)",
                    recipe.model, error)
        return
    for method in (m for m in recipe.methods if m != "features"):  # features applies no method
        method_recipe = recipe.for_method(method)
        model = copy.deepcopy(base)
        try:
            heads = (list(method_recipe.head_modules) if method_recipe.head_modules is not None
                     else default_head_modules(model, task.TASK_KIND))
            apply_method(model, method, method_recipe, task.TASK_KIND, heads, weightless=True,
                         modality=task_modality(task))
        except (NotImplementedError, RuntimeError) as error:  # an operation without weights: the run checks it
            logger.info("pre-flight check of %s stopped at an operation that needs weights: %s", method, error)
        except (ValueError, TypeError, KeyError) as error:
            raise RecipeError(f"method {method}: {error} (found before training; nothing was trained)") from error
