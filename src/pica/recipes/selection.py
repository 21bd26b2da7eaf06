"""Choices made on a validation split carved from the training data, never on the eval split:
the learning rate (``lr: auto``) and the checkpoint (``early_stopping_patience``).

The split is seeded by the run's seed and stratified by label for classification
(scikit-learn ``train_test_split``); each ``lr: auto`` grid point is one :func:`pica.recipes.fit.fit`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

from .config import RecipeConfig, RecipeError
from .defaults import lr_grid
from .fit import fit, selection_metric
from .prepared import PreparedRun

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_VALIDATION_FRACTION", "check_selection", "choose_lr", "needs_validation", "split_validation"]

DEFAULT_VALIDATION_FRACTION = 0.2
"""Share of the training examples held out when ``validation_fraction`` is unset."""


def needs_validation(recipe: RecipeConfig) -> bool:
    """Whether a one-method recipe chooses something on validation (``lr: auto`` or early stopping)."""
    return recipe.lr == "auto" or recipe.early_stopping_patience is not None


def _stratify_labels(examples: list[dict], task_kind: str, options: dict[str, Any]) -> list | None:
    if task_kind == "classification" and options.get("problem") == "classification":
        return [str(example["label"]) for example in examples]
    return None


def split_validation(examples: list[dict], fraction: float | None, seed: int, task_kind: str,
                     options: dict[str, Any]) -> tuple[list[dict], list[dict]]:
    """``(fit, validation)``: ``fraction`` of ``examples`` held out (seeded; stratified by label for
    classification).

    Raises:
        RecipeError: naming ``validation_fraction``: the split would leave a side without an example of
            every class (or empty), with the counts.
    """
    from sklearn.model_selection import train_test_split

    fraction = DEFAULT_VALIDATION_FRACTION if fraction is None else fraction
    labels = _stratify_labels(examples, task_kind, options)
    try:
        fit_index, validation_index = train_test_split(list(range(len(examples))), test_size=fraction,
                                                       random_state=seed, shuffle=True, stratify=labels)
    except ValueError as error:
        counts = "" if labels is None else (f", {len(set(labels))} classes, smallest with "
                                            f"{min(labels.count(label) for label in set(labels))} example(s)")
        raise RecipeError(f"validation_fraction {fraction}: cannot carve a{' stratified' if labels else ''} "
                          f"validation split from {len(examples)} training examples{counts} ({error}); use more "
                          "training data or another validation_fraction") from None
    return [examples[i] for i in sorted(fit_index)], [examples[i] for i in sorted(validation_index)]


def check_selection(prepared: PreparedRun) -> None:
    """Pre-flight of ``lr: auto`` / early stopping for every trained method, before any training.

    Raises:
        RecipeError: ``lr_grid`` set but no method has ``lr: auto``; ``validation_fraction`` set but
            nothing uses a validation split; a split too small to stratify; a metric that cannot be
            computed on validation.
    """
    resolved = [planned.recipe for planned in prepared.trained_methods()]
    if any(r.lr_grid is not None for r in resolved) and not any(r.lr == "auto" for r in resolved):
        raise RecipeError("lr_grid is set but no method has lr: auto (the grid would be unused)")
    users = [r for r in resolved if needs_validation(r)]
    if any(r.validation_fraction is not None for r in resolved) and not users:
        raise RecipeError("validation_fraction is set but nothing uses a validation split "
                          "(set lr: auto or early_stopping_patience)")
    for one in users:
        split_validation(prepared.train_examples, one.validation_fraction, prepared.recipe.seeds[0],
                         prepared.task_kind, prepared.options)
        selection_metric(prepared.task, prepared.options, prepared.metric)


def choose_lr(prepared: PreparedRun, method: str, recipe: RecipeConfig, seed: int, directory: Path,
              progress: bool) -> dict[str, Any]:
    """Train ``method`` once per grid learning rate on the fit part, score each on the validation part.

    Args:
        prepared: the comparison (task, options, examples).
        recipe: the method's resolved recipe, with ``lr: auto``.
        directory: scratch space for the grid's Trainer outputs (removed).

    Returns:
        ``{"grid", "metric", "greater_is_better", "validation": {lr: score}, "chosen", "fit_examples",
        "validation_examples", "seconds"}``; ``chosen`` is the best score's learning rate (the smaller
        learning rate on a tie; a NaN score counts as the worst).
    """
    started = time.perf_counter()
    grid = lr_grid(method, recipe.lr_grid)
    fit_part, validation = split_validation(prepared.train_examples, recipe.validation_fraction, seed,
                                            prepared.task_kind, prepared.options)
    name, greater = selection_metric(prepared.task, prepared.options, prepared.metric)
    scores: dict[float, float] = {}
    for lr in grid:
        point = directory / f"lr{lr:g}"
        fitted = fit(prepared, method, dataclasses.replace(recipe, lr=lr), seed, fit_part, validation, point,
                     progress)
        scores[lr] = math.nan if fitted.diverged else float(fitted.trainer.evaluate()[f"eval_{name}"])
        shutil.rmtree(point, ignore_errors=True)
        logger.info("lr auto: %s seed %d lr %g → validation %s %.4f", method, seed, lr, name, scores[lr])
    worst = -math.inf if greater else math.inf  # a diverged run (NaN score) is never chosen
    chosen = (max if greater else min)(sorted(grid), key=lambda lr: worst if math.isnan(scores[lr]) else scores[lr])
    shutil.rmtree(directory, ignore_errors=True)
    return {"grid": grid, "metric": name, "greater_is_better": greater,
            "validation": {f"{lr:g}": scores[lr] for lr in grid}, "chosen": chosen,
            "fit_examples": len(fit_part), "validation_examples": len(validation),
            "seconds": round(time.perf_counter() - started, 2)}
