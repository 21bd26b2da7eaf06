"""The ``pica`` subcommands (printing lives here; the work is done in :mod:`pica.recipes`)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

from ..io import check_output_directory
from . import _DEMO_FIELDS, _EVAL_FIELDS, _overrides
from .analyze import run_analyze

logger = logging.getLogger(__name__)

__all__ = ["run_analyze", "run_demo", "run_eval", "run_export", "run_train"]


def _all_fields() -> list[str]:
    from ..recipes.config import RecipeConfig

    return [item.name for item in dataclasses.fields(RecipeConfig)]


def _apply_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def _report(results: dict[str, Any], output_dir: str, seconds: float) -> None:
    print()
    print(results["table"])
    print(f"\nwall time {seconds:.0f} s; results, plots and adapters in {output_dir}/")


def run_train(args: argparse.Namespace) -> int:
    """``pica train``: resolve recipe + flags, validate and load everything, then train and compare."""
    from ..recipes.config import resolve_recipe
    from ..recipes.harness import prepare, run_experiment

    recipe = resolve_recipe(args.recipe, _overrides(args, _all_fields()))
    _apply_threads(recipe.threads)
    started = time.perf_counter()
    prepared = prepare(recipe, inputs={"recipe": args.recipe})
    results = run_experiment(prepared, progress=not args.no_progress)
    _report(results, recipe.output_dir, time.perf_counter() - started)
    return 0


def run_demo(args: argparse.Namespace) -> int:
    """``pica demo``: the embedded comparison on real weights and data, offline."""
    from ..recipes.config import load_recipe_file
    from ..recipes.demo import demo_examples, demo_recipe
    from ..recipes.harness import prepare, run_experiment

    overrides = load_recipe_file(args.recipe) if args.recipe else {}
    overrides.update(_overrides(args, _DEMO_FIELDS))
    recipe = demo_recipe(overrides, args.quick)
    _apply_threads(recipe.threads)
    started = time.perf_counter()
    train, test = demo_examples(recipe.train_limit, recipe.eval_limit)
    print(f"pica demo: all-MiniLM-L6-v2, {len(train)} train / {len(test)} test tweets (3 classes), "
          f"methods {', '.join(recipe.methods)}, rank {recipe.rank}, {recipe.epochs:g} epoch(s)")
    prepared = prepare(recipe, train_examples=train, eval_examples=test, inputs={"recipe": args.recipe})
    results = run_experiment(prepared, progress=not args.no_progress)
    _report(results, recipe.output_dir, time.perf_counter() - started)
    return 0


def _saved_context(args: argparse.Namespace, overrides: dict[str, Any]):
    """(directory, kind, run info, merged settings) of a saved run for eval/export.

    Without a ``run.json`` (a bare adapter directory), the base model defaults to the adapter's
    recorded ``base_model_name_or_path``.
    """
    from ..recipes.models import absolute_if_local
    from ..recipes.run_records import RUN_INFO_KEYS
    from ..recipes.saved import adapter_config, find_saved

    directory, kind, info = find_saved(args.adapter)
    settings = {key: info[key] for key in RUN_INFO_KEYS if info.get(key) is not None}
    settings.update(overrides)
    if kind == "adapter" and not settings.get("model"):
        recorded = adapter_config(directory).get("base_model_name_or_path")
        if not isinstance(recorded, str) or not recorded:
            raise ValueError(f"{directory}: no run.json and no base model recorded in adapter_config.json; "
                             "pass --model")
        settings["model"] = recorded
    if "model" in settings:
        settings["model"] = absolute_if_local(settings["model"])
    return directory, kind, info, settings


def _inputs(args: argparse.Namespace, directory, settings: dict[str, Any], **more: Any) -> dict[str, Any]:
    """Everything eval/export read, by name, for :func:`pica.io.refuse_replacing_inputs`."""
    model, gguf = settings.get("model"), settings.get("gguf_file")
    return {"adapter": args.adapter, "saved run": directory, "recipe": getattr(args, "recipe", None),
            "base model": model, "gguf_file": str(Path(model) / gguf) if model and gguf else None, **more}


def _task_kind_of(directory: Path, kind: str, settings: dict[str, Any], info: dict[str, Any]) -> str:
    """The task kind to load a saved run for: from its task, checked against the adapter's task type."""
    from ..recipes.methods import adapter_task_kind
    from ..recipes.saved import adapter_config
    from ..recipes.tasks import get_task

    recorded = adapter_config(directory).get("task_type") if kind == "adapter" else None
    adapter_kind = adapter_task_kind(recorded)
    if "task" not in settings:
        return adapter_kind or "generative"
    task_kind = get_task(settings["task"]).TASK_KIND
    if adapter_kind is not None and adapter_kind != task_kind:
        source = "run.json" if info.get("task") == settings["task"] else "--task, the recipe or the default"
        raise ValueError(f"{directory} holds a {recorded} ({adapter_kind}) adapter, but task {settings['task']!r} "
                         f"(from {source}) is {task_kind}; pass --task for a {adapter_kind} task")
    return task_kind


def _eval_options(task, directory: Path, kind: str, examples: list[dict], options: dict[str, Any]) -> dict[str, Any]:
    """Task options for evaluating a run whose ``run.json`` (with the training labels) may be missing."""
    import logging

    from ..recipes.saved import saved_head_size

    if task.TASK_KIND != "classification" or options.get("num_labels") or not hasattr(task, "infer_options"):
        return options
    given = options.get("labels") is not None
    options = task.infer_options(examples, options)
    if not given:
        logging.getLogger("pica.cli").warning(
            "%s has no run.json: labels %s inferred from the evaluation data (sorted, as training does by default); "
            "pass --task-options '{\"labels\": [...]}' with the training labels in id order if they differ",
            directory, options.get("labels"))
    head = saved_head_size(directory) if kind == "adapter" else None
    if head is not None and head != options["num_labels"]:
        raise ValueError(f"{directory}: the saved classifier has {head} outputs, but the labels {options['labels']} "
                         f"give {options['num_labels']}; pass --task-options '{{\"labels\": [...]}}' with the "
                         "training labels in id order")
    return options


def run_eval(args: argparse.Namespace) -> int:
    """``pica eval``: evaluate a saved adapter (any method) or model on a task."""
    from ..io import atomic_directory
    from ..recipes.config import RecipeError, resolve_recipe
    from ..recipes.harness import evaluate_model
    from ..recipes.models import load_processor
    from ..recipes.prepared import PreparedRun
    from ..recipes.results import write_json, write_jsonl
    from ..recipes.saved import load_saved
    from ..recipes.tasks import get_task, task_modality

    file_values = {}
    if args.recipe:
        from ..recipes.config import load_recipe_file

        file_values = {k: v for k, v in load_recipe_file(args.recipe).items() if k in _EVAL_FIELDS}
    directory, kind, info, settings = _saved_context(args, {**file_values, **_overrides(args, _EVAL_FIELDS)})
    output_dir = settings.pop("output_dir", None)
    recipe = resolve_recipe(None, {**settings, "output_dir": output_dir or "unused"})
    if output_dir:
        eval_inputs = _inputs(args, directory, settings, eval_data=recipe.eval_data)
        check_output_directory(output_dir, recipe.overwrite, "output_dir", eval_inputs)
    if recipe.eval_data is None:
        raise RecipeError("eval_data is required (--eval-data)")
    _apply_threads(recipe.threads)
    task = get_task(recipe.task)
    _task_kind_of(directory, kind, {**settings, "task": recipe.task}, info)
    examples = task.load_examples(recipe.eval_data, limit=recipe.eval_limit, **recipe.task_options)
    options = _eval_options(task, directory, kind, examples, dict(recipe.task_options))
    base = recipe.model if kind == "adapter" else str(directory)
    tokenizer = load_processor(task, base, recipe.gguf_file if kind == "adapter" else None, options)
    model = load_saved(directory, kind, task.TASK_KIND, model=recipe.model, gguf_file=recipe.gguf_file,
                       dtype=recipe.dtype, options=options, pad_token_id=getattr(tokenizer, "pad_token_id", None),
                       quantize=recipe.quantize,  # as trained (run.json), unless --quantize says otherwise
                       modality=task_modality(task))
    import torch

    if torch.cuda.is_available():
        model = model.to("cuda")
    prepared = PreparedRun(recipe, task, options, tokenizer, [], examples)
    started = time.perf_counter()
    evaluation = evaluate_model(model, prepared, recipe, progress=not args.no_progress)
    result = {"saved": str(directory), "kind": kind, "method": info.get("method"), "task": recipe.task,
              "eval_data": recipe.eval_data, "examples": len(examples), "metrics": evaluation["metrics"],
              "eval_seconds": round(time.perf_counter() - started, 2)}
    print(json.dumps(result, indent=2))
    if output_dir:
        with atomic_directory(output_dir, recipe.overwrite, "output_dir", eval_inputs) as staging:
            write_json(staging / "results.json", result)
            write_jsonl(staging / "predictions.jsonl", evaluation["predictions"])
    return 0


def run_export(args: argparse.Namespace) -> int:
    """``pica export --to lora|merged``: wraps ``pica.export_lora`` / ``pica.export_merged``."""
    import torch

    import pica

    from ..recipes.models import load_processor
    from ..recipes.saved import adapter_config, load_saved, saved_head_size
    from ..recipes.tasks import get_task, task_modality

    overrides = {k: v for k, v in {"model": args.model, "gguf_file": args.gguf_file}.items() if v is not None}
    directory, kind, info, settings = _saved_context(args, overrides)
    if kind != "adapter":
        raise ValueError(f"{directory} is a full model, not an adapter; nothing to export")
    peft_type = str(adapter_config(directory).get("peft_type", "")).upper()
    if peft_type != "PICA":
        advice = ("it is already a PEFT LoRA adapter: serve or load it as it is, or merge it with peft's "
                  "merge_and_unload()" if peft_type == "LORA" else "merge it with peft's merge_and_unload()")
        raise ValueError(f"{directory} holds a {peft_type or 'non-PiCa'} adapter, not a PiCa one: `pica export` "
                         f"converts PiCa adapters; {advice}")
    check_output_directory(args.out, args.overwrite, "--out", _inputs(args, directory, settings))
    task_kind = _task_kind_of(directory, kind, settings, info)
    options = dict(settings.get("task_options", {}))
    if task_kind == "classification" and not options.get("num_labels"):  # no run.json: size the head as saved
        options["num_labels"] = saved_head_size(directory)
    task = get_task(settings["task"]) if "task" in settings else None
    modality = task_modality(task) if task is not None else "text"
    tokenizer = (load_processor(task, settings["model"], settings.get("gguf_file"), options)
                 if "model" in settings else None)
    if settings.get("quantize"):
        logger.info("%s was trained on a %s base; exporting from the full-precision weights it was quantised from "
                    "(PiCa's serving path: P and fingerprints re-derived from them quantised again)",
                    directory, settings["quantize"])
    model = load_saved(directory, kind, task_kind, model=settings.get("model"), gguf_file=settings.get("gguf_file"),
                       dtype=settings.get("dtype", "float32"), options=options,
                       pad_token_id=getattr(tokenizer, "pad_token_id", None), modality=modality)
    if args.to == "lora":
        dtype = getattr(torch, args.dtype) if args.dtype else None
        out = pica.export_lora(model, args.out, dtype=dtype, overwrite=args.overwrite)
    else:
        export_merged = getattr(pica, "export_merged", None)
        if export_merged is None:
            raise ValueError("export --to merged needs pica.export_merged, which this pica version lacks")
        out = export_merged(model, args.out, tokenizer=tokenizer, overwrite=args.overwrite)
    print(f"exported {directory} as {args.to} to {out}")
    return 0
