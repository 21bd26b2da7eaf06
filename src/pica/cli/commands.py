"""The ``pica`` subcommands (printing lives here; the work is done in :mod:`pica.recipes`)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from . import _DEMO_FIELDS, _EVAL_FIELDS, _overrides
from .analyze import run_analyze

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
    prepared = prepare(recipe)
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
    prepared = prepare(recipe, train_examples=train, eval_examples=test)
    results = run_experiment(prepared, progress=not args.no_progress)
    _report(results, recipe.output_dir, time.perf_counter() - started)
    return 0


def _saved_context(args: argparse.Namespace, overrides: dict[str, Any]):
    """(directory, kind, run info, merged settings) of a saved run for eval/export."""
    from ..recipes.saved import find_saved

    directory, kind, info = find_saved(args.adapter)
    settings = {key: info.get(key) for key in ("task", "task_options", "model", "gguf_file", "dtype", "max_length")}
    settings = {k: v for k, v in settings.items() if v is not None}
    settings.update(overrides)
    return directory, kind, info, settings


def run_eval(args: argparse.Namespace) -> int:
    """``pica eval``: evaluate a saved adapter (any method) or model on a task."""
    from ..io import atomic_directory
    from ..recipes.config import RecipeError, resolve_recipe
    from ..recipes.harness import PreparedRun, evaluate_model
    from ..recipes.models import load_tokenizer
    from ..recipes.results import write_json
    from ..recipes.saved import load_saved
    from ..recipes.tasks import get_task

    file_values = {}
    if args.recipe:
        from ..recipes.config import load_recipe_file

        file_values = {k: v for k, v in load_recipe_file(args.recipe).items() if k in _EVAL_FIELDS}
    directory, kind, info, settings = _saved_context(args, {**file_values, **_overrides(args, _EVAL_FIELDS)})
    output_dir = settings.pop("output_dir", None)
    recipe = resolve_recipe(None, {**settings, "output_dir": output_dir or "unused"})
    if output_dir and Path(output_dir).exists() and not recipe.overwrite:
        raise RecipeError(f"output_dir {output_dir} exists; pass --overwrite to replace it")
    if recipe.eval_data is None:
        raise RecipeError("eval_data is required (--eval-data)")
    _apply_threads(recipe.threads)
    task = get_task(recipe.task)
    options = dict(recipe.task_options)
    examples = task.load_examples(recipe.eval_data, limit=recipe.eval_limit, **options)
    base = recipe.model if kind == "adapter" else str(directory)
    tokenizer = load_tokenizer(base, recipe.gguf_file if kind == "adapter" else None)
    model = load_saved(directory, kind, task.TASK_KIND, model=recipe.model, gguf_file=recipe.gguf_file,
                       dtype=recipe.dtype, options=options, pad_token_id=tokenizer.pad_token_id)
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
        with atomic_directory(output_dir, recipe.overwrite, "output_dir") as staging:
            write_json(staging / "results.json", result)
            (staging / "predictions.jsonl").write_text(
                "".join(json.dumps(p, default=str) + "\n" for p in evaluation["predictions"]), encoding="utf-8")
    return 0


def run_export(args: argparse.Namespace) -> int:
    """``pica export --to lora|merged``: wraps ``pica.export_lora`` / ``pica.export_merged``."""
    import torch

    import pica

    from ..recipes.models import load_tokenizer
    from ..recipes.saved import load_saved

    overrides = {k: v for k, v in {"model": args.model, "gguf_file": args.gguf_file}.items() if v is not None}
    directory, kind, info, settings = _saved_context(args, overrides)
    if kind != "adapter":
        raise ValueError(f"{directory} is a full model, not an adapter; nothing to export")
    if Path(args.out).exists() and not args.overwrite:
        raise ValueError(f"export: {args.out} exists; pass --overwrite to replace it")
    from ..recipes.tasks import get_task

    if "task" in settings:
        task_kind = get_task(settings["task"]).TASK_KIND
    else:  # no run.json: the adapter's own task type decides
        adapter_config = json.loads((directory / "adapter_config.json").read_text(encoding="utf-8"))
        task_kind = "classification" if adapter_config.get("task_type") == "SEQ_CLS" else "generative"
    options = settings.get("task_options", {})
    tokenizer = load_tokenizer(settings["model"], settings.get("gguf_file")) if "model" in settings else None
    model = load_saved(directory, kind, task_kind, model=settings.get("model"), gguf_file=settings.get("gguf_file"),
                       dtype=settings.get("dtype", "float32"), options=options,
                       pad_token_id=tokenizer.pad_token_id if tokenizer is not None else None)
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
