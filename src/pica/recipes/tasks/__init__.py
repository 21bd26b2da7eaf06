"""Task registry: a task is a module with ``TASK_KIND``, ``load_examples``, ``build_train_dataset``,
``evaluate`` (see the interface in each task module). Modules are imported lazily by name, so a
task whose module is not installed fails only when it is asked for.

Optional hook: ``infer_options(train_examples, options) -> options`` fills options that depend on
the training data (classify: label names, problem type, headline metric).

Optional for non-text inputs (``image-classify``): ``MODALITY`` (``"text"`` if absent; ``"image"``
loads ``AutoModelForImageClassification``), ``load_processor(source, options)`` (what the harness
passes where a text task gets the tokenizer), ``data_collator(processor)`` and ``describe(example)``
(the fields a prediction record shows).
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Union

__all__ = ["MODALITIES", "TASK_KINDS", "available_tasks", "get_task", "register_task", "task_modality"]

TASK_KINDS = ("generative", "classification")
MODALITIES = ("text", "image")
_REQUIRED = ("TASK_KIND", "load_examples", "build_train_dataset", "evaluate")

_REGISTRY: dict[str, Union[str, ModuleType]] = {
    "classify": "pica.recipes.tasks.classify",
    "image-classify": "pica.recipes.tasks.image_classify",
    "math": "pica.recipes.tasks.math",
    "commonsense": "pica.recipes.tasks.commonsense",
}


def register_task(name: str, module: Union[str, ModuleType]) -> None:
    """Register a task under ``name``: a module object or an importable module name."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"task name must be a non-empty string, got {name!r}")
    _REGISTRY[name] = module


def available_tasks() -> list[str]:
    """Registered task names (whether or not their module is importable)."""
    return sorted(_REGISTRY)


def get_task(name: str) -> ModuleType:
    """The task module registered as ``name``, checked against the interface.

    Raises:
        ValueError: unknown task (listing known ones), task module not installed, or a module that
            lacks part of the interface (naming what is missing).
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown task {name!r}; known tasks: {available_tasks()}")
    module = _REGISTRY[name]
    if isinstance(module, str):
        try:
            module = importlib.import_module(module)
        except ModuleNotFoundError as error:
            if error.name and module.startswith(error.name):
                raise ValueError(f"task {name!r} is not available (module {module} is not installed)") from None
            raise
    missing = [attr for attr in _REQUIRED if not hasattr(module, attr)]
    if missing:
        raise ValueError(f"task {name!r} ({module.__name__}) lacks {missing} of the task interface")
    if module.TASK_KIND not in TASK_KINDS:
        raise ValueError(f"task {name!r}: TASK_KIND must be one of {TASK_KINDS}, got {module.TASK_KIND!r}")
    if task_modality(module) not in MODALITIES:
        raise ValueError(f"task {name!r}: MODALITY must be one of {MODALITIES}, got {module.MODALITY!r}")
    return module


def task_modality(task: ModuleType) -> str:
    """What the task's model reads: ``"text"`` (tokenizer) or ``"image"`` (image processor)."""
    return getattr(task, "MODALITY", "text")
