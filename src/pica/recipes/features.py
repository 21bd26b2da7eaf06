"""``--method features``: a frozen-feature reference for classification.

The frozen base model embeds every example; the embedding is the input of the classification head
(``classifier``/``score``), i.e. exactly what the ``probe``'s head sees (BERT: the ``[CLS]`` pooler
output; decoder models, whose ``score`` head reads every position: the last attended token's hidden
state, the position transformers reads the logits from). A scikit-learn ``LogisticRegression``
(features standardised by ``StandardScaler``, L2, lbfgs) is fitted on the training embeddings, its
regularisation ``C`` chosen among :data:`C_GRID` by ``GridSearchCV`` (stratified 5-fold accuracy on the
training rows only; fewer folds if a class has fewer rows; ``C=1`` when a class has one row), and
evaluated with the task's metrics. No gradient step, no learning rate; its trainable
parameters are the regression's weights and intercepts (counted as head). Nothing is saved as a model
(no pickle); predictions and results are.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .config import RecipeConfig, RecipeError
from .fit import load_run_base, task_collator
from .heads import head_module, head_modules
from .prepared import PreparedRun

logger = logging.getLogger(__name__)

__all__ = ["C_GRID", "FeaturesFit", "check_features", "fit_features", "pooled_features"]

C_GRID = tuple(float(c) for c in np.logspace(-3, 2, 11))
"""Inverse regularisation strengths the cross-validation chooses from (1e-3 … 1e2, ×√10 apart)."""

_USED = frozenset({"model", "gguf_file", "dtype", "head_modules", "max_length", "eval_batch_size"})
"""The per_method keys ``features`` uses (it has no learning rate, schedule or adapter)."""


@dataclass
class FeaturesFit:
    """What :func:`fit_features` measured.

    Attributes:
        metrics: the task's metrics on the eval examples.
        predictions: one record per eval example (the task's fields, ``target``, ``prediction``, ``correct``).
        trainable_params: the regression's weights and intercepts, counted as head.
        heads: the task-head modules whose input is the feature.
        regularization: ``{"C", "cv_folds"}`` (0 folds: no cross-validation).
        train_seconds, eval_seconds: embedding + fit, embedding + prediction.
    """

    metrics: dict[str, float]
    predictions: list[dict[str, Any]]
    trainable_params: dict[str, int]
    heads: list[str]
    regularization: dict[str, Any]
    train_seconds: float
    eval_seconds: float


def check_features(prepared: PreparedRun) -> None:
    """Refuse ``features`` where it has no meaning (a generative task, a regression problem) and
    ``per_method.features`` keys it would ignore."""
    recipe, task, options = prepared.recipe, prepared.task, prepared.options
    if "features" not in recipe.methods:
        return
    unused = sorted(set(recipe.per_method.get("features", {})) - _USED)
    if unused:
        raise RecipeError(f"per_method.features: {unused} do not apply to features (it uses only {sorted(_USED)})")
    if task.TASK_KIND != "classification" or options.get("problem") != "classification":
        raise RecipeError("method features (logistic regression on frozen features) needs a classification task "
                          f"(task {recipe.task!r}, problem {options.get('problem')!r})")


def pooled_features(model: nn.Module, head: nn.Module, dataset, collator, batch_size: int) -> np.ndarray:
    """The input of ``head`` for every row of ``dataset``, in order: ``(rows, hidden)`` float32."""
    captured: list[torch.Tensor] = []

    def keep(module: nn.Module, inputs: tuple) -> None:
        captured.append(inputs[0].detach())

    rows = [dataset[i] for i in range(len(dataset))]
    chunks = []
    handle = head.register_forward_pre_hook(keep)
    try:
        with torch.no_grad():
            for start in range(0, len(rows), batch_size):
                batch = collator([{k: v for k, v in row.items() if k != "labels"} for row in rows[start:start + batch_size]])
                captured.clear()
                model(**batch)
                hidden = captured[-1].float()  # (batch, hidden) or (batch, tokens, hidden)
                if hidden.dim() == 3:
                    mask = batch["attention_mask"]  # (batch, tokens); left or right padding
                    last = mask.shape[1] - 1 - mask.flip(1).argmax(dim=1)
                    hidden = hidden[torch.arange(hidden.shape[0]), last]
                chunks.append(hidden.cpu().numpy())
    finally:
        handle.remove()
    return np.concatenate(chunks)


def fit_features(prepared: PreparedRun, recipe: RecipeConfig, seed: int) -> FeaturesFit:
    """Embed the train and eval examples with the frozen model, fit the logistic regression, evaluate.

    Args:
        prepared: the comparison (task, options, processor, examples).
        recipe: the resolved ``features`` recipe (``prepared.methods["features"].recipe``).
        seed: seeds the cross-validation folds and the regression.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    task, options, tokenizer = prepared.task, prepared.options, prepared.tokenizer
    model = load_run_base(prepared, recipe, seed).eval()
    heads = head_modules(model, task.TASK_KIND, recipe.head_modules)
    head = head_module(model, heads)
    collator = task_collator(task, tokenizer)

    def embed(examples: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        dataset = task.build_train_dataset(examples, tokenizer, max_length=recipe.max_length, **options)
        return (pooled_features(model, head, dataset, collator, recipe.eval_batch_size),
                np.asarray(dataset["labels"]))

    started = time.perf_counter()
    train_x, train_y = embed(prepared.train_examples)
    folds = min(5, int(np.unique(train_y, return_counts=True)[1].min()))
    folds = folds if folds >= 2 else 0  # a class with one training row: nothing to cross-validate on
    regression = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    chosen_c = 1.0
    if folds:  # the scaler is refitted inside every fold; the best C is refitted on all training rows
        search = GridSearchCV(regression, {"logisticregression__C": list(C_GRID)}, scoring="accuracy",
                              cv=StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed))
        search.fit(train_x, train_y)
        regression, chosen_c = search.best_estimator_, float(search.best_params_["logisticregression__C"])
    else:
        regression.fit(train_x, train_y)
    train_seconds = time.perf_counter() - started
    started = time.perf_counter()
    eval_x, eval_y = embed(prepared.eval_examples)
    # predict() returns the class values seen in training; an eval label unseen there is never predicted
    predicted = regression.predict(eval_x)
    metrics = task.compute_metrics(eval_y, predicted, "classification", options["num_labels"])
    linear = regression[-1]
    count = int(linear.coef_.size + linear.intercept_.size)
    labels = options["labels"]
    shown = task.describe if hasattr(task, "describe") else (lambda e: {"text": e["text"], "text_pair": e["text_pair"]})
    predictions = [{**shown(e), "target": e["label"], "prediction": labels[p],
                    "correct": bool(labels[p] == e["label"])} for e, p in zip(prepared.eval_examples, predicted)]
    logger.info("features: logistic regression (C=%g by %d-fold CV) on %d × %d frozen features, %s", chosen_c,
                folds, *train_x.shape, metrics)
    return FeaturesFit(metrics=metrics, predictions=predictions, heads=heads,
                       regularization={"C": chosen_c, "cv_folds": folds},
                       trainable_params={"adapter": 0, "head": count, "total": count,
                                         "model_total": sum(p.numel() for p in model.parameters()) + count},
                       train_seconds=train_seconds, eval_seconds=time.perf_counter() - started)
