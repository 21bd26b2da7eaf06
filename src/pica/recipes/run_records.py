"""What one (method, seed) run writes about itself: its result record and ``run.json``.

* ``results.json`` (:class:`RunResult`): the metrics, parameter counts, learning rate and where it came
  from, timings and peak memory of the run; the comparison's ``results.json`` lists these records.
* ``run.json`` (:func:`write_run_info` / :func:`read_run_info`): what ``pica eval``, ``export`` and
  ``analyze`` need to rebuild the base model of a saved run: the recipe values :data:`RUN_INFO_KEYS`
  plus the method, seed, what was saved and the head modules.

Both are written here and nowhere else, through :func:`pica.recipes.results.write_json` (atomic).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from ..io import AdapterFileError, read_json_object
from . import results
from .config import RecipeConfig, RecipeError
from .defaults import LrSource
from .measure import PeakMemory

__all__ = ["RUN_INFO_KEYS", "RunResult", "read_run_info", "write_run_info"]

RUN_INFO_KEYS = ("task", "task_options", "model", "gguf_file", "dtype", "max_length", "quantize")
"""The recipe values ``run.json`` records (``task_options`` as the task completed them: labels, problem, ...)."""

_RUN_TYPES: dict[str, tuple[type, ...]] = {  # run.json key → accepted JSON types (None is always accepted)
    "task": (str,), "task_options": (dict,), "model": (str,), "gguf_file": (str,), "dtype": (str,),
    "max_length": (int,), "method": (str,), "seed": (int,), "saved": (str,), "head_modules": (list,),
}


@dataclass
class RunResult:
    """The result record of one (method, seed) run, its ``results.json``.

    Times are in seconds, rounded when the record is made (``init_seconds`` to 3 decimals, the others to
    2; ``peak_memory_mb`` to 1).

    Attributes:
        method, seed, task, model, quantize: what ran (``model``: the base model's path or hub id).
        metrics: the task's metrics on the eval examples (generative: also ``eval_loss`` ...).
        trainable_params: ``{"adapter", "head", "total", "model_total"}``
            (:func:`pica.recipes.methods.parameter_split`).
        lr, lr_source, lr_search: the learning rate trained at, where it came from
            (:data:`pica.recipes.defaults.LrSource`), and the ``lr: auto`` grid
            (:func:`pica.recipes.selection.choose_lr`); None for ``features``.
        epochs: the epochs of the schedule (None for ``features``).
        early_stopping: what early stopping chose (None without it).
        train_loss, steps: the Trainer's mean training loss and optimiser steps.
        init_seconds: time to apply the method (PiCa: the projectors); train/eval/wall: as named.
        peak_memory_mb, memory_kind: :class:`pica.recipes.measure.PeakMemory` over training and evaluation.
        device: ``"cuda"`` or ``"cpu (N threads)"``.
        saved: ``"adapter"``, ``"model"`` or None (what the run directory holds).
        head_modules: the task-head modules trained in full.
        regularization: ``features`` only: ``{"C", "cv_folds"}`` of its logistic regression.
    """

    method: str
    seed: int
    task: str
    model: Optional[str]
    metrics: dict[str, Any]
    trainable_params: dict[str, int]
    lr: Optional[float]
    lr_source: Optional[LrSource]
    lr_search: Optional[dict[str, Any]]
    epochs: Optional[float]
    early_stopping: Optional[dict[str, Any]]
    train_loss: Optional[float]
    steps: int
    init_seconds: float
    train_seconds: float
    eval_seconds: float
    wall_seconds: float
    peak_memory_mb: float
    memory_kind: str
    device: str
    saved: Optional[str]
    head_modules: list[str]
    quantize: Optional[str]
    regularization: Optional[dict[str, Any]] = None

    @classmethod
    def of(cls, recipe: RecipeConfig, seed: int, memory: PeakMemory, **fields: Any) -> "RunResult":
        """The record of a run of ``recipe`` (one method): task, model, quantize, memory and device filled in.

        ``fields`` are the remaining attributes; times and memory are rounded.
        """
        record = cls(method=recipe.methods[0], seed=seed, task=recipe.task, model=recipe.model,
                     quantize=recipe.quantize, peak_memory_mb=round(memory.peak_mb, 1), memory_kind=memory.kind,
                     device=_device(), **fields)
        record.init_seconds = round(record.init_seconds, 3)
        for name in ("train_seconds", "eval_seconds", "wall_seconds"):
            setattr(record, name, round(getattr(record, name), 2))
        return record

    def to_dict(self) -> dict[str, Any]:
        """The record as written to ``results.json`` (``regularization`` only where it is set)."""
        data = dataclasses.asdict(self)
        if data["regularization"] is None:
            del data["regularization"]
        return data

    def write(self, run_dir: Path) -> dict[str, Any]:
        """Write ``run_dir/results.json``; returns :meth:`to_dict`."""
        data = self.to_dict()
        results.write_json(run_dir / "results.json", data)
        return data


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"


def write_run_info(run_dir: Path, recipe: RecipeConfig, task_options: dict[str, Any], *, seed: int,
                   saved: Optional[str], head_modules: list[str]) -> None:
    """Write ``run_dir/run.json`` of a run of the one-method ``recipe`` (see the module docstring)."""
    info = {**{key: getattr(recipe, key) for key in RUN_INFO_KEYS}, "task_options": task_options,
            "method": recipe.methods[0], "seed": seed, "saved": saved, "head_modules": head_modules}
    results.write_json(run_dir / "run.json", info)


def read_run_info(path: str | Path) -> dict[str, Any]:
    """Read and check a run's ``run.json`` (what ``pica train`` recorded to rebuild the base model).

    Raises:
        AdapterFileError: not readable JSON, nested too deeply, not an object, or a key with a wrong
            type or value (naming the file and the key).
    """
    info = read_json_object(path)
    for key, types in _RUN_TYPES.items():
        value = info.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, types)):
            raise AdapterFileError(f"{path}: {key} must be a {types[0].__name__}, got {value!r}")
    try:
        RecipeConfig(**{key: info[key] for key in RUN_INFO_KEYS if info.get(key) is not None})
    except RecipeError as error:
        raise AdapterFileError(f"{path}: {error}") from None
    return info
