"""One ``Trainer`` run of one method: load the base model, apply the method, train, optionally
evaluate on a validation split each epoch with early stopping and the best checkpoint kept.

Used by the harness for the final run of every (method, seed) and by ``lr: auto`` for each point
of its grid, so both train in exactly the same way.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Optional

import numpy as np
import torch
from transformers import (DataCollatorForSeq2Seq, DataCollatorWithPadding, EarlyStoppingCallback, EvalPrediction,
                          Trainer, TrainingArguments, set_seed)

from .config import RecipeConfig, RecipeError
from .heads import head_modules
from .measure import projector_progress
from .methods import apply_method, parameter_split
from .models import load_base_model
from .prepared import PreparedRun
from .tasks import task_modality

logger = logging.getLogger(__name__)

__all__ = ["Fitted", "TrainingDivergedError", "build_model", "divergence", "fit", "load_run_base", "selection_metric",
           "task_collator", "training_arguments"]

_TRAINER_METRICS = {"classification": ("accuracy", "f1", "matthews"), "regression": ("pearson", "spearman")}


@dataclass
class Fitted:
    """A trained model with what the run reports about its training."""

    trainer: Trainer
    training_loss: float
    params: dict[str, int]
    heads: list[str]
    init_seconds: float
    train_seconds: float
    diverged: Optional[str] = None
    """What became non-finite in training (the loss, trainable tensors), or None: see :func:`divergence`."""


class TrainingDivergedError(RuntimeError):
    """A run's loss or trainable weights became non-finite: a failed run, never a published result."""


def divergence(model: torch.nn.Module, training_loss: float, log_history: list[dict]) -> Optional[str]:
    """What is non-finite after training (the mean or any logged loss, trainable tensors), or None.

    Argmax of NaN logits still gives an accuracy, so a diverged model must be caught here, not by its scores.
    """
    problems = []
    losses = [entry["loss"] for entry in log_history if isinstance(entry.get("loss"), (int, float))]
    if not math.isfinite(training_loss) or not all(math.isfinite(loss) for loss in losses):
        problems.append(f"training loss {training_loss!r}")
    trainable = [(name, parameter) for name, parameter in model.named_parameters() if parameter.requires_grad]
    bad = [name for name, parameter in trainable if not torch.isfinite(parameter.detach()).all()]
    if bad:
        problems.append(f"{len(bad)} of {len(trainable)} trainable tensors non-finite (e.g. {bad[0]})")
    return "; ".join(problems) or None


def selection_metric(task: ModuleType, options: dict[str, Any], metric: str) -> tuple[str, bool]:
    """``(name, greater_is_better)`` of the validation metric that chooses a learning rate or checkpoint.

    Classification tasks: the headline ``metric`` (computed by the task's ``compute_metrics`` on the
    validation split). Generative tasks: ``loss``, the answer-token loss of the validation split
    (generating every validation answer at every evaluation would cost more than the training).

    Raises:
        RecipeError: a classification headline metric the task does not compute.
    """
    if task.TASK_KIND != "classification":
        return "loss", False
    known = _TRAINER_METRICS[options.get("problem") or "classification"]
    if metric not in known:
        raise RecipeError(f"metric {metric!r} cannot choose on validation: a {options.get('problem')} task "
                          f"computes {list(known)}")
    return metric, True


def _trainer_metrics(task: ModuleType, options: dict[str, Any]) -> Optional[Callable[[EvalPrediction], dict]]:
    """``compute_metrics`` for ``Trainer`` (classification: the task's metrics on argmax / the score)."""
    if task.TASK_KIND != "classification":
        return None
    problem, num_labels = options["problem"], options["num_labels"]

    def compute(prediction: EvalPrediction) -> dict[str, float]:
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        predicted = logits[:, 0] if problem == "regression" else np.argmax(logits, axis=-1)
        return task.compute_metrics(np.asarray(prediction.label_ids), predicted, problem, num_labels)

    return compute


def task_collator(task: ModuleType, processor: Any) -> Callable[[list[dict]], dict]:
    """How a task's training rows are batched: the task's own ``data_collator`` (images: stacked pixels) if it
    has one, else padded token ids (generative: labels padded with -100)."""
    if hasattr(task, "data_collator"):
        return task.data_collator(processor)
    if task.TASK_KIND == "generative":
        return DataCollatorForSeq2Seq(processor, label_pad_token_id=-100, padding=True)
    return DataCollatorWithPadding(processor)


def training_arguments(recipe: RecipeConfig, seed: int, output_dir: Path, progress: bool,
                       best_by: Optional[tuple[str, bool]] = None) -> TrainingArguments:
    """The ``TrainingArguments`` of ``recipe``.

    With ``best_by`` (metric, greater is better): an evaluation on the validation split every epoch;
    with ``recipe.early_stopping_patience`` also a checkpoint every epoch and the best one loaded at
    the end (what ``EarlyStoppingCallback`` needs).
    """
    cuda = torch.cuda.is_available()
    checkpointing = {}
    if recipe.gradient_checkpointing:  # transformers ≥5 renamed the argument
        fields = TrainingArguments.__dataclass_fields__
        checkpointing = {"activation_checkpointing" if "activation_checkpointing" in fields
                         else "gradient_checkpointing": True}
    validation: dict[str, Any] = {"save_strategy": "no"}
    if best_by is not None:
        validation = {"eval_strategy": "epoch", "save_strategy": "no", "metric_for_best_model": best_by[0],
                      "greater_is_better": best_by[1], "per_device_eval_batch_size": recipe.eval_batch_size}
        if recipe.early_stopping_patience is not None:
            validation.update(save_strategy="epoch", load_best_model_at_end=True, save_total_limit=1,
                              save_only_model=True)
    return TrainingArguments(
        output_dir=str(output_dir), learning_rate=recipe.lr, num_train_epochs=recipe.epochs,
        max_steps=recipe.max_steps, per_device_train_batch_size=recipe.batch_size,
        gradient_accumulation_steps=recipe.grad_accum, warmup_steps=recipe.warmup,
        lr_scheduler_type=recipe.scheduler, weight_decay=recipe.weight_decay, logging_steps=recipe.logging_steps,
        logging_first_step=True, report_to=[], seed=seed, data_seed=seed, use_cpu=not cuda,
        bf16=cuda and recipe.dtype == "bfloat16", fp16=cuda and recipe.dtype == "float16",
        remove_unused_columns=False, **checkpointing, **validation,
        label_names=["labels"], disable_tqdm=not progress,
        train_sampling_strategy="group_by_length" if recipe.group_by_length else "random",
    )


def load_run_base(prepared: PreparedRun, recipe: RecipeConfig, seed: int) -> torch.nn.Module:
    """The base model a run of ``recipe`` starts from (:func:`pica.recipes.models.load_base_model` with the
    task's labels and the processor's pad token), its new task head drawn after ``set_seed(seed)``, so it
    starts from the same draw for every method; quantised as ``recipe.quantize`` says."""
    options = prepared.options
    set_seed(seed)
    return load_base_model(recipe.model, prepared.task_kind, gguf_file=recipe.gguf_file, dtype=recipe.dtype,
                           num_labels=options.get("num_labels"), problem=options.get("problem"),
                           pad_token_id=getattr(prepared.tokenizer, "pad_token_id", None), quantize=recipe.quantize,
                           head_modules=recipe.head_modules, modality=task_modality(prepared.task))


def build_model(prepared: PreparedRun, method: str, recipe: RecipeConfig, seed: int,
                progress: bool = False) -> tuple[torch.nn.Module, list[str], float]:
    """The model ``fit`` trains: the base (quantised by bitsandbytes and prepared for k-bit training if
    ``recipe.quantize``), a new task head drawn after ``set_seed(seed)``, and ``method`` applied.

    Returns:
        ``(model, head module names, seconds spent applying the method)`` (PiCa: the projectors).
    """
    kind, modality = prepared.task_kind, task_modality(prepared.task)
    model = load_run_base(prepared, recipe, seed)
    if recipe.quantize is not None:  # freeze, float32 norms/embeddings; checkpointing is the Trainer's (recipe)
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    heads = head_modules(model, kind, recipe.head_modules)
    started = time.perf_counter()
    with projector_progress(progress):  # the projector pool uses torch.get_num_threads() threads
        model = apply_method(model, method, recipe, kind, heads, modality=modality)
    return model, heads, time.perf_counter() - started


def fit(prepared: PreparedRun, method: str, recipe: RecipeConfig, seed: int, train_examples: list[dict],
        validation_examples: Optional[list[dict]], output_dir: Path, progress: bool) -> Fitted:
    """Train ``method`` with ``recipe`` (its ``lr`` already a number) on ``train_examples``.

    With ``validation_examples``, the validation metric (:func:`selection_metric`) is computed at the
    end of every epoch (``eval_<metric>`` in the trainer's log history; ``trainer.evaluate()`` scores
    the returned model); ``recipe.early_stopping_patience`` (if set) stops training after that many
    epochs without improvement (``EarlyStoppingCallback``), and the best epoch's checkpoint is what
    the returned trainer holds (``load_best_model_at_end``).

    Args:
        prepared: the comparison (task, options, tokenizer).
        recipe: the method's resolved recipe (``prepared.methods[method].recipe``), ``lr`` a number.
        output_dir: Trainer's output directory (checkpoints); the caller removes it.
    """
    task, options, tokenizer = prepared.task, prepared.options, prepared.tokenizer
    model, heads, init_seconds = build_model(prepared, method, recipe, seed, progress)
    params = parameter_split(model, heads)
    logger.info("%s: trainable %s", method, params)

    def dataset(examples: list[dict]):
        return task.build_train_dataset(examples, tokenizer, max_length=recipe.max_length, **options)

    collator = task_collator(task, tokenizer)
    if recipe.gradient_checkpointing and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    best_by = None if validation_examples is None else selection_metric(task, options, prepared.metric)
    callbacks = []
    if validation_examples is not None and recipe.early_stopping_patience is not None:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=recipe.early_stopping_patience))
    trainer = Trainer(model=model, args=training_arguments(recipe, seed, output_dir, progress, best_by),
                      train_dataset=dataset(train_examples), data_collator=collator, callbacks=callbacks,
                      eval_dataset=None if validation_examples is None else dataset(validation_examples),
                      compute_metrics=None if validation_examples is None else _trainer_metrics(task, options))
    started = time.perf_counter()
    output = trainer.train()
    return Fitted(trainer, output.training_loss, params, heads, init_seconds, time.perf_counter() - started,
                  divergence(trainer.model, output.training_loss, trainer.state.log_history))
