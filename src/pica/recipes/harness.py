"""The experiment harness: every method on the same data, schedule and evaluation, through
transformers ``Trainer`` (no hand-written loop, collator, scheduler or checkpointing).

Everything that can fail on bad input (recipe, task, data rows, model path, output directory) is
checked in :func:`prepare` before anything is written; each run writes its records through
:mod:`pica.recipes.run_records`. Outputs are built in a hidden sibling
directory and renamed into place at the end (:func:`pica.io.atomic_directory`), so a failed run
leaves no partial output directory.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
import traceback
from pathlib import Path
from typing import Any, Optional

import yaml
from transformers import Trainer

from .answer_loss import answer_token_loss
from .config import WHOLE_MODEL_METHODS, RecipeConfig, RecipeError, RunsFailedError
from .features import check_features, fit_features
from .fit import TrainingDivergedError, fit
from .measure import PeakMemory
from .models import load_processor
from .preflight import check_before_training
from .prepared import PreparedRun
from .rank_outputs import is_distributed, rank_output_directory
from .results import format_choices, format_table, plot_comparison, plot_loss, summarize, write_json, write_jsonl
from .run_records import RunResult, write_run_info
from .selection import check_selection, choose_lr, split_validation
from .tasks import get_task

logger = logging.getLogger(__name__)

__all__ = ["evaluate_model", "prepare", "run_experiment", "train_one"]


def prepare(recipe: RecipeConfig, train_examples: Optional[list[dict]] = None,
            eval_examples: Optional[list[dict]] = None, inputs: Optional[dict[str, Optional[str]]] = None
            ) -> PreparedRun:
    """Validate everything and load the data; writes nothing (but the cache entry of a GGUF or ONNX model
    converted to load its tokenizer or processor).

    Every method is resolved once (:class:`pica.recipes.prepared.MethodRecipe`, in the returned
    ``PreparedRun.methods``); the output directory, the pre-flight of every method on a weightless model,
    the validation split of ``lr: auto`` / early stopping and the ``features`` reference are checked on
    those resolved methods.

    Local paths of the recipe (``model``, ``train_data``, ``eval_data``) are made absolute in the
    returned recipe, so ``run.json``, ``config.yaml`` and the adapters' ``base_model_name_or_path``
    still point at them from another directory (hub ids and dataset names stay as written).

    Args:
        recipe: the resolved recipe.
        train_examples: examples to train on instead of ``recipe.train_data`` (e.g. the demo's).
        eval_examples: examples to evaluate on instead of ``recipe.eval_data``.
        inputs: further input files that ``output_dir`` must not replace, by name
            (e.g. ``{"recipe": path}``); the recipe's own model and data are always checked.

    Raises:
        RecipeError / ValueError / FileNotFoundError: naming the key, task, file and line at fault.
        pica.io.OutputWouldDeleteInputError, NotADirectoryError, FileExistsError: ``output_dir`` is or
            contains an input or the current directory, is a file, or is not empty without ``overwrite``.
    """
    from ..io import check_output_directory
    from .models import absolute_if_local

    task = get_task(recipe.task)
    if recipe.model is None:
        raise RecipeError("model is required (--model or the recipe key 'model')")
    paths = ("model", "train_data", "eval_data")
    per_method = {method: {key: absolute_if_local(value) if key in paths else value for key, value in values.items()}
                  for method, values in recipe.per_method.items()}
    recipe = dataclasses.replace(recipe, per_method=per_method,
                                 **{key: absolute_if_local(getattr(recipe, key)) for key in paths})
    options = dict(recipe.task_options)
    if train_examples is None:
        if recipe.train_data is None:
            raise RecipeError("train_data is required (--train-data or the recipe key 'train_data')")
        train_examples = task.load_examples(recipe.train_data, limit=recipe.train_limit, **options)
    if eval_examples is None:
        if recipe.eval_data is None:
            raise RecipeError("eval_data is required (--eval-data or the recipe key 'eval_data')")
        eval_examples = task.load_examples(recipe.eval_data, limit=recipe.eval_limit, **options)
    if hasattr(task, "infer_options"):
        options = task.infer_options(train_examples, options)
    tokenizer = load_processor(task, recipe.model, recipe.gguf_file, options)
    prepared = PreparedRun(recipe, task, options, tokenizer, train_examples, eval_examples)
    checked = {**(inputs or {}), **{key: getattr(recipe, key) for key in paths}}
    for planned in prepared.methods.values():  # per_method may name another model or GGUF file
        checked[f"model of {planned.method}"] = planned.recipe.model
        if planned.recipe.gguf_file and planned.recipe.model:
            checked[f"gguf_file of {planned.method}"] = str(Path(planned.recipe.model) / planned.recipe.gguf_file)
    check_output_directory(Path(recipe.output_dir), recipe.overwrite, "output_dir", checked)
    check_before_training(prepared)
    check_selection(prepared)
    check_features(prepared)
    return prepared


def evaluate_model(model, prepared: PreparedRun, recipe: RecipeConfig, progress: bool = True) -> dict:
    """Run the task's evaluation with the recipe's batch size / generation length.

    Generative tasks: the task's metric on the first ``recipe.generate_limit`` eval examples (all if
    unset), plus, if ``recipe.eval_loss``, the answer-token loss on every eval example
    (:func:`pica.recipes.answer_loss.answer_token_loss`: metrics ``eval_loss``, ``eval_loss_tokens``,
    ``eval_loss_examples``) and the timings ``generate_seconds`` / ``eval_loss_seconds``.
    """
    extra: dict[str, Any] = {"batch_size": recipe.eval_batch_size, "max_new_tokens": recipe.max_new_tokens,
                             "progress": progress}
    examples = prepared.eval_examples
    if prepared.task_kind == "classification":
        extra["max_length"] = recipe.max_length
        return prepared.task.evaluate(model, prepared.tokenizer, examples, **extra, **prepared.options)
    started = time.perf_counter()
    generated = examples if recipe.generate_limit is None else examples[:recipe.generate_limit]
    evaluation = prepared.task.evaluate(model, prepared.tokenizer, generated, **extra, **prepared.options)
    evaluation["metrics"] = {**evaluation["metrics"], "generated_examples": len(generated),
                             "generate_seconds": round(time.perf_counter() - started, 2)}
    if recipe.eval_loss:
        started = time.perf_counter()
        loss = answer_token_loss(model, prepared.tokenizer, prepared.task, examples, max_length=recipe.max_length,
                                 batch_size=recipe.eval_batch_size, options=prepared.options)
        evaluation["metrics"].update(loss, eval_loss_seconds=round(time.perf_counter() - started, 2))
    return evaluation


def train_one(prepared: PreparedRun, method: str, seed: int, run_dir: Path, progress: bool = True) -> dict:
    """Train and evaluate one (method, seed) into ``run_dir``; returns its result record (:class:`RunResult`).

    The method's settings are ``prepared.methods[method]``: its learning rate is the recipe's, else the
    method's default (:mod:`pica.recipes.defaults`), or with ``lr: auto`` the best of a grid on a validation
    split (:func:`pica.recipes.selection.choose_lr`); then the final run trains on all the training data, or,
    with ``early_stopping_patience``, on the fit part with the best epoch by validation kept. ``lr`` (the
    value used), ``lr_source``, ``lr_search`` and ``early_stopping`` are in the result.
    """
    planned = prepared.methods[method]
    if not planned.trains:
        return _features_run(prepared, seed, run_dir)
    recipe, lr_source = planned.recipe, planned.lr_source
    run_dir.mkdir(parents=True)
    file_log = logging.FileHandler(run_dir / "train.log", encoding="utf-8")
    file_log.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(file_log)
    try:
        logger.info("run %s seed %d (lr %s, %s) → %s", method, seed, recipe.lr, lr_source, run_dir)
        started = time.perf_counter()
        lr_search = None
        if recipe.lr == "auto":
            lr_search = choose_lr(prepared, method, recipe, seed, run_dir / "lr_search", progress)
            recipe = dataclasses.replace(recipe, lr=lr_search["chosen"])
        train_examples, validation = prepared.train_examples, None
        if recipe.early_stopping_patience is not None:
            train_examples, validation = split_validation(train_examples, recipe.validation_fraction, seed,
                                                          prepared.task_kind, prepared.options)
        with PeakMemory() as memory:
            fitted = fit(prepared, method, recipe, seed, train_examples, validation, run_dir / "trainer", progress)
            if fitted.diverged:
                raise TrainingDivergedError(f"{method} seed {seed} diverged at lr {recipe.lr:g} ({lr_source}): "
                                            f"{fitted.diverged}; nothing of it is published (try a smaller lr)")
            trainer = fitted.trainer
            eval_started = time.perf_counter()
            evaluation = evaluate_model(trainer.model, prepared, recipe, progress)
            eval_seconds = time.perf_counter() - eval_started
        wall_seconds = time.perf_counter() - started
        saved = _save_trained(trainer, prepared, method, run_dir) if recipe.save_model else None
        shutil.rmtree(run_dir / "trainer", ignore_errors=True)
        history = trainer.state.log_history
        write_jsonl(run_dir / "train_log.jsonl", history)
        plot_loss(history, run_dir / "loss.png", f"{recipe.task}: {method}, seed {seed}")
        write_jsonl(run_dir / "predictions.jsonl", evaluation["predictions"])
        result = RunResult.of(
            recipe, seed, memory, metrics=evaluation["metrics"], trainable_params=fitted.params, lr=recipe.lr,
            lr_source=lr_source, lr_search=lr_search, epochs=recipe.epochs,
            early_stopping=_early_stopping(trainer, recipe, len(train_examples), validation),
            train_loss=fitted.training_loss, steps=trainer.state.global_step, init_seconds=fitted.init_seconds,
            train_seconds=fitted.train_seconds, eval_seconds=eval_seconds, wall_seconds=wall_seconds, saved=saved,
            head_modules=fitted.heads)
        write_run_info(run_dir, recipe, prepared.options, seed=seed, saved=saved, head_modules=fitted.heads)
        return result.write(run_dir)
    finally:
        logging.getLogger().removeHandler(file_log)
        file_log.close()


def _save_trained(trainer: Trainer, prepared: PreparedRun, method: str, run_dir: Path) -> str:
    """Save the trained adapter (``run_dir/adapter``) or, for ``full``/``probe``, the model with its processor
    (``run_dir/model``); returns which."""
    saved = "model" if method in WHOLE_MODEL_METHODS else "adapter"
    trainer.save_model(str(run_dir / saved))  # gathers sharded (FSDP) weights; writes on the main process
    (run_dir / saved / "training_args.bin").unlink(missing_ok=True)  # Trainer's pickle; run.json has the options
    if saved == "model":
        prepared.tokenizer.save_pretrained(run_dir / saved)
    return saved


def _features_run(prepared: PreparedRun, seed: int, run_dir: Path) -> dict:
    """The ``features`` reference (:func:`pica.recipes.features.fit_features`) into ``run_dir``."""
    recipe = prepared.methods["features"].recipe
    run_dir.mkdir(parents=True)
    started = time.perf_counter()
    with PeakMemory() as memory:
        fitted = fit_features(prepared, recipe, seed)
    write_jsonl(run_dir / "predictions.jsonl", fitted.predictions)
    result = RunResult.of(
        recipe, seed, memory, metrics=fitted.metrics, trainable_params=fitted.trainable_params, lr=None,
        lr_source=None, lr_search=None, epochs=None, early_stopping=None, train_loss=None, steps=0,
        init_seconds=0.0, train_seconds=fitted.train_seconds, eval_seconds=fitted.eval_seconds,
        wall_seconds=time.perf_counter() - started, saved=None, head_modules=fitted.heads,
        regularization=fitted.regularization)
    return result.write(run_dir)


def _early_stopping(trainer: Trainer, recipe: RecipeConfig, fit_examples: int,
                    validation: Optional[list[dict]]) -> Optional[dict[str, Any]]:
    """What early stopping did: the best epoch and its validation score, the epochs trained."""
    if validation is None:
        return None
    state = trainer.state
    key = f"eval_{trainer.args.metric_for_best_model}"
    best = next((entry for entry in state.log_history if entry.get(key) == state.best_metric), {})
    return {"patience": recipe.early_stopping_patience, "metric": trainer.args.metric_for_best_model,
            "best_metric": state.best_metric, "best_step": best.get("step"), "best_epoch": best.get("epoch"),
            "epochs_trained": state.epoch, "fit_examples": fit_examples, "validation_examples": len(validation)}


def run_experiment(prepared: PreparedRun, progress: bool = True) -> dict:
    """Every method × seed of the recipe; writes the output directory atomically; returns results.

    The output is built with :func:`pica.io.atomic_directory`: a failed run leaves no partial
    directory, and with ``overwrite`` the old output is replaced only once the new one is complete.
    Under ``torchrun`` / ``accelerate launch`` only rank 0 publishes it (see :func:`pica.recipes.rank_outputs.rank_output_directory`).

    Everything that can be checked before training was checked by :func:`prepare`. If a run still fails
    (e.g. out of memory, a diverging loss), the other runs go on, and the finished ones are published
    with the failed ones listed (``failed`` in ``results.json`` and ``table.txt``, each failed run's
    ``train.log`` and ``error.txt`` (the traceback) kept); then :class:`RunsFailedError` is raised. If no run finishes,
    the first error is raised and nothing is written. Under ``torch.distributed`` the first error is
    raised at once (the other processes would wait for it in a collective).

    Raises:
        RunsFailedError: some runs failed, at least one finished.
    """
    recipe = prepared.recipe
    failed: list[dict] = []
    with rank_output_directory(Path(recipe.output_dir).resolve(), recipe.overwrite) as staging:
        resolved = {**recipe.to_dict(), "task_options": prepared.options}
        (staging / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False), encoding="utf-8")
        runs, first_error = [], None
        for method in recipe.methods:
            for seed in recipe.seeds:
                run_dir = staging / method / f"seed{seed}"
                try:
                    runs.append(train_one(prepared, method, seed, run_dir, progress))
                except Exception as error:
                    if is_distributed():
                        raise
                    logger.exception("run %s seed %d failed; going on with the other runs", method, seed)
                    first_error = first_error or error
                    failed.append({"method": method, "seed": seed, "error": f"{type(error).__name__}: {error}"})
                    run_dir.mkdir(parents=True, exist_ok=True)
                    (run_dir / "error.txt").write_text(traceback.format_exc(), encoding="utf-8")
        if not runs:
            raise first_error
        summary = summarize(runs)
        table = format_table(summary, prepared.metric)
        choices = format_choices(runs)
        if choices:
            table += "\n\nchosen on validation (split from the training data):\n" + choices
        if failed:
            table += "\n\nfailed: " + "; ".join(f"{f['method']} seed {f['seed']} ({f['error']})" for f in failed)
        if len(summary) > 1:
            plot_comparison(summary, prepared.metric, staging / "comparison.png",
                            f"{recipe.task}: {prepared.metric} vs trainable parameters")
        results = {"task": recipe.task, "model": recipe.model, "metric": prepared.metric, "summary": summary,
                   "runs": runs, "failed": failed, "table": table}
        write_json(staging / "results.json", results)
        (staging / "table.txt").write_text(table + "\n", encoding="utf-8")
    if failed:
        raise RunsFailedError(f"{len(failed)} of {len(failed) + len(runs)} runs failed "
                              f"({'; '.join(f['method'] + ' seed ' + str(f['seed']) + ': ' + f['error'] for f in failed)}"
                              f"); the {len(runs)} finished run(s) are in {recipe.output_dir}", failed, results)
    return results
