"""The recipe: every option of a ``pica train``/``eval`` run, from a YAML/JSON file and flags.

Resolution order: field defaults < recipe file < command-line flags. Unknown keys, wrong types
and bad values are refused with an error naming the key (and the file), before anything runs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

from ..io import nesting_depth

__all__ = ["METHODS", "WHOLE_MODEL_METHODS", "RecipeConfig", "RecipeError", "RunsFailedError", "load_recipe_file", "resolve_recipe"]

METHODS = ("pica", "lora", "dora", "vera", "pissa", "full", "probe", "features")
"""``probe`` trains only the task head (frozen encoder, linear probe); ``full`` trains everything;
``features`` (classification only) fits a scikit-learn logistic regression on the frozen model's
pooled features (:mod:`pica.recipes.features`), no Trainer."""

WHOLE_MODEL_METHODS = ("full", "probe")
"""Methods that train the model itself (no adapter): a run saves the whole model, not an adapter."""


_UNQUANTIZABLE = {"full": "full fine-tuning updates the quantised weights themselves",
                  "probe": "the probe trains only the head: quantising the frozen body is not what it measures",
                  "pissa": "peft's PiSSA initialisation needs float weights (it rewrites W0)",
                  "features": "the frozen-feature reference reads the unquantised model (no training to save memory on)"}
"""Methods refused with ``quantize``, and why."""


class RecipeError(ValueError):
    """A recipe key, value or file is wrong; the message names it."""


class RunsFailedError(RuntimeError):
    """Some runs of a comparison failed after others finished; the finished ones were published.

    Attributes:
        failed: ``{"method", "seed", "error"}`` per failed run.
        results: the published results (finished runs only).
    """

    def __init__(self, message: str, failed: list[dict], results: dict) -> None:
        super().__init__(message)
        self.failed, self.results = failed, results


def _opt(default: Any, help: str, **extra: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **extra})
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class RecipeConfig:
    """All options of a run. Each field is a recipe key and a ``--flag`` (underscores → dashes)."""

    # what to learn
    task: str = _opt("classify", "task format: classify, math, commonsense")
    train_data: Optional[str] = _opt(None, "training data: .jsonl/.json/.csv file (classify: also a datasets name)")
    eval_data: Optional[str] = _opt(None, "evaluation data, same formats as train_data")
    task_options: dict = _opt({}, "task-specific options as a JSON object (classify: text_fields, label_field, "
                                  "labels, problem, metric, split, eval_split, encoding)")
    train_limit: Optional[int] = _opt(None, "use only the first N training examples")
    eval_limit: Optional[int] = _opt(None, "use only the first N evaluation examples")
    # model
    model: Optional[str] = _opt(None, "base model: local directory, hub id, or directory/file with gguf_file")
    gguf_file: Optional[str] = _opt(None, "GGUF file inside/next to --model (de-quantised by transformers)")
    dtype: Literal["float32", "bfloat16", "float16"] = _opt("float32", "dtype of the base model weights")
    quantize: Optional[Literal["4bit", "8bit"]] = _opt(None, "load the base quantised by bitsandbytes for the adapter "
                                                             "methods (QLoRA-style): 4bit = nf4 computing in dtype, "
                                                             "8bit = int8 rows")
    # method
    methods: list = _opt(["pica"], f"one or more of {', '.join(METHODS)}; several → a comparison", flag="--method")
    rank: int = _opt(16, "rank of PiCa / LoRA / DoRA / VeRA / PiSSA")
    lora_alpha: Optional[float] = _opt(None, "LoRA/DoRA alpha (default 2×rank; PiSSA uses rank)")
    lora_dropout: float = _opt(0.0, "LoRA/DoRA/PiSSA dropout")
    target_modules: Optional[list] = _opt(None, "modules to adapt (default: PiCa's per-architecture targets)")
    head_modules: Optional[list] = _opt(None, "task head kept trainable via modules_to_save (default: auto)")
    share: bool = _opt(True, "PiCa: one M per role across depth (--no-share: one M per layer)")
    subspace: Literal["top", "random"] = _opt("top", "PiCa: top singular subspace, or a random orthonormal one")
    subspace_seed: int = _opt(0, "PiCa: seed of the random subspace")
    # schedule (Trainer)
    lr: Union[float, Literal["auto"], None] = _opt(
        None, "peak learning rate; unset: the method's default (pica.recipes.defaults.DEFAULT_LR); 'auto': "
              "chosen per method on a validation split carved from the training data (see lr_grid)")
    lr_grid: Optional[list] = _opt(None, "lr: auto: the learning rates to try (default: the method's default "
                                         "× 1/3, 1, 3)", flag_type=float)
    validation_fraction: Optional[float] = _opt(
        None, "lr: auto / early_stopping_patience: fraction of the training data held out for validation "
              "(default 0.2; stratified by label for classification; seeded by the run's seed)")
    early_stopping_patience: Optional[int] = _opt(
        None, "stop when the validation metric has not improved for N evaluations (one per epoch; epochs is "
              "then the maximum) and keep the best checkpoint")
    per_method: dict = _opt({}, 'per-method overrides as JSON, e.g. {"full": {"lr": 5e-5}}')
    epochs: Optional[float] = _opt(None, "training epochs (unset: the task's default, "
                                         "pica.recipes.defaults.DEFAULT_EPOCHS: classify 5, math/commonsense 1)")
    max_steps: int = _opt(-1, "stop after N optimiser steps (-1: use epochs)")
    batch_size: int = _opt(16, "per-device training batch size")
    eval_batch_size: int = _opt(32, "evaluation batch size")
    grad_accum: int = _opt(1, "gradient accumulation steps")
    warmup: float = _opt(0.03, "warm-up: fraction of steps if < 1, else a number of steps")
    scheduler: str = _opt("linear", "transformers lr_scheduler_type (linear, cosine, constant, ...)")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    max_length: int = _opt(256, "maximum tokens per training example")
    max_new_tokens: int = _opt(256, "generative tasks: maximum generated tokens at evaluation")
    gradient_checkpointing: bool = _opt(False, "trade compute for memory")
    group_by_length: bool = _opt(False, "batch examples of similar length together (less padding, faster)")
    logging_steps: int = _opt(10, "log the training loss every N steps")
    # generative evaluation: answer-token loss and the generated subset
    eval_loss: bool = _opt(True, "generative tasks: also report eval_loss, the loss on the reference responses "
                                 "of the eval set (prompt tokens masked; --no-eval-loss to skip)")
    generate_limit: Optional[int] = _opt(None, "generative tasks: generate and score only the first N eval "
                                               "examples (eval_loss still uses all of them)")
    seeds: list = _opt([0], "run each seed; several → mean ± sd")
    metric: Optional[str] = _opt(None, "headline metric for tables and plots (default: the task's)")
    threads: Optional[int] = _opt(None, "torch CPU threads (default: torch's)")
    output_dir: str = _opt("outputs/run", "where results, adapters, logs and plots go")
    overwrite: bool = _opt(False, "replace an existing output directory")
    save_model: bool = _opt(True, "save the adapter (or the full model for full/probe) of every run")

    def __post_init__(self) -> None:
        for item in dataclasses.fields(self):
            setattr(self, item.name, _check(item.name, getattr(self, item.name), _hints()[item.name]))
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise RecipeError(f"unknown method(s) {unknown or self.methods}; choose from {list(METHODS)}")
        if len(set(self.methods)) != len(self.methods):
            raise RecipeError(f"methods: duplicates in {self.methods}")
        if not self.seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in self.seeds):
            raise RecipeError(f"seeds must be a non-empty list of ints, got {self.seeds!r}")
        if len(set(self.seeds)) != len(self.seeds):
            raise RecipeError(f"seeds: duplicates in {self.seeds} (each seed is one run directory)")
        for name, (valid, wanted) in _RANGES.items():
            value = getattr(self, name)
            if value is not None and not valid(value):
                raise RecipeError(f"{name} must be {wanted}, got {value!r}")
        _check_scheduler(self.scheduler)
        _check_selection(self)
        quantized = [m for m in self.methods if m in _UNQUANTIZABLE
                     and self.per_method.get(m, {}).get("quantize", self.quantize) is not None]
        if quantized:
            reasons = "; ".join(f"{method}: {_UNQUANTIZABLE[method]}" for method in quantized)
            raise RecipeError(f"quantize: method(s) {quantized} cannot train on a quantised base ({reasons}); "
                              "quantize works with pica, lora, dora and vera (drop quantize for those methods "
                              "with per_method, e.g. {\"full\": {\"quantize\": null}})")
        for method, overrides in self.per_method.items():
            if method not in METHODS or not isinstance(overrides, dict):
                raise RecipeError(f"per_method: key {method!r} must be a method of {list(METHODS)} "
                                  "mapping to {field: value}")
            bad = sorted(set(overrides) - set(_hints()) | set(overrides) & {"methods", "per_method", "output_dir"})
            if bad:
                raise RecipeError(f"per_method.{method}: unknown or not overridable key(s) {bad}")

    def for_method(self, method: str) -> "RecipeConfig":
        """This recipe with ``per_method[method]`` applied and ``methods == [method]``.

        A run's settings add the defaults on top: :func:`pica.recipes.prepared.resolve_method`.
        """
        values = {**self.to_dict(), **self.per_method.get(method, {}), "methods": [method], "per_method": {}}
        return RecipeConfig(**values)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))


_RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {  # option → (valid?, what it must be); None is not checked
    **{name: (lambda v: v >= 1, "≥ 1") for name in ("rank", "batch_size", "eval_batch_size", "grad_accum", "max_length",
                                                     "max_new_tokens", "logging_steps", "generate_limit", "train_limit",
                                                     "eval_limit", "threads")},
    "lr": (lambda v: v == "auto" or v > 0, "> 0 (or 'auto')"),
    "epochs": (lambda v: v > 0, "> 0"),
    "max_steps": (lambda v: v == -1 or v >= 1, "-1 (use epochs) or ≥ 1"),
    "warmup": (lambda v: v >= 0, "≥ 0"),
    "weight_decay": (lambda v: v >= 0, "≥ 0"),
    "lora_alpha": (lambda v: v > 0, "> 0"),
    "lora_dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
}
"""Value ranges of the numeric options (floats are also finite: :func:`_check`)."""


def _check_scheduler(name: str) -> None:
    """``scheduler`` must be one of transformers' ``lr_scheduler_type`` values (checked before anything loads)."""
    from transformers.trainer_utils import SchedulerType

    known = [kind.value for kind in SchedulerType]
    if name not in known:
        raise RecipeError(f"scheduler must be one of {known}, got {name!r}")


def _check_selection(recipe: RecipeConfig) -> None:
    """``lr_grid``, ``validation_fraction`` and ``early_stopping_patience``: values, and used by something."""
    if recipe.lr_grid is not None:
        grid = recipe.lr_grid
        if len(grid) < 2 or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf
                                for v in grid):
            raise RecipeError(f"lr_grid must be at least 2 finite positive numbers, got {grid!r}")
        if len(set(grid)) != len(grid):
            raise RecipeError(f"lr_grid: duplicates in {grid!r}")
    if recipe.validation_fraction is not None and not 0 < recipe.validation_fraction < 1:
        raise RecipeError(f"validation_fraction must be between 0 and 1 (exclusive), got {recipe.validation_fraction}")
    if recipe.early_stopping_patience is not None and recipe.early_stopping_patience < 1:
        raise RecipeError(f"early_stopping_patience must be ≥ 1, got {recipe.early_stopping_patience}")


_HINTS: dict[str, Any] = {}


def _hints() -> dict[str, Any]:
    if not _HINTS:
        _HINTS.update(typing.get_type_hints(RecipeConfig))
    return _HINTS


def _check(name: str, value: Any, hint: Any) -> Any:
    """Validate/coerce one value against its annotation; ``RecipeError`` naming ``name`` if wrong."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for alternative in (a for a in args if a is not type(None)):
            try:
                return _check(name, value, alternative)
            except RecipeError as error:
                errors.append(str(error).removeprefix(f"{name} must be ").split(", got ")[0])
        raise RecipeError(f"{name} must be {' or '.join(errors)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise RecipeError(f"{name} must be one of {list(args)}, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{name} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{name} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{name} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise RecipeError(f"{name} must be a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str) or not value:
            raise RecipeError(f"{name} must be a non-empty string, got {value!r}")
        return value
    if hint in (list, dict):
        if isinstance(value, tuple) and hint is list:
            value = list(value)
        if not isinstance(value, hint):
            raise RecipeError(f"{name} must be a {'list' if hint is list else 'mapping'}, got {value!r}")
        return value
    raise TypeError(f"recipe field {name}: unsupported annotation {hint!r}")  # pragma: no cover


MAX_RECIPE_BYTES = 1 << 20
"""Largest recipe file read (1 MiB): a recipe is a few dozen keys."""
MAX_RECIPE_DEPTH = 20
"""Deepest nesting of lists/mappings in a recipe (``per_method`` → method → key → value is 4)."""


def _recipe_loader():
    """A ``yaml.SafeLoader`` subclass that refuses aliases (``*name``).

    Aliases are what a "billion laughs" bomb is made of (a few lines expanding to 10⁹ list items,
    hanging the process before any validation); no recipe needs them.
    """
    import yaml

    class RecipeLoader(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise yaml.composer.ComposerError(
                    None, None, f"YAML aliases (*{event.anchor}) are not allowed in a recipe; write the value out",
                    event.start_mark)
            return super().compose_node(parent, index)

    return RecipeLoader


def load_recipe_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML (``.yaml``/``.yml``) or JSON recipe into a dict, checking its keys.

    Bounded, so a hostile or broken file fails fast with a message: at most
    :data:`MAX_RECIPE_BYTES` bytes, no YAML aliases, at most :data:`MAX_RECIPE_DEPTH` levels of
    nesting. A leading UTF-8 byte-order mark is accepted.

    Raises:
        FileNotFoundError: naming the path.
        RecipeError: too large, not UTF-8, nested too deeply, uses YAML aliases, unparsable, not a
            mapping, or keys that are not recipe fields (named).
    """
    path = Path(path)
    if not path.is_file():
        if path.exists():
            raise RecipeError(f"recipe {path}: not a regular file")
        raise FileNotFoundError(f"recipe file not found: {path}")
    size = path.stat().st_size
    if size > MAX_RECIPE_BYTES:
        raise RecipeError(f"recipe {path}: {size} bytes is too large for a recipe (limit {MAX_RECIPE_BYTES})")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise RecipeError(f"recipe {path}: not UTF-8 text ({error})") from None
    except OSError as error:
        raise RecipeError(f"recipe {path}: cannot read: {error}") from None
    too_deep = RecipeError(f"recipe {path}: nested too deeply (more than {MAX_RECIPE_DEPTH} levels of lists/mappings)")
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.load(text, Loader=_recipe_loader())  # noqa: S506  (a SafeLoader subclass)
        else:
            data = json.loads(text)
    except RecursionError:
        raise too_deep from None
    except Exception as error:  # yaml.YAMLError / json.JSONDecodeError
        raise RecipeError(f"recipe {path}: cannot parse: {error}") from error
    if nesting_depth(data, MAX_RECIPE_DEPTH) > MAX_RECIPE_DEPTH:
        raise too_deep
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {path}: top level must be a mapping of keys, got {type(data).__name__}")
    if "method" in data:  # the flag's name is accepted as a key too
        data["methods"] = data.pop("method")
    if isinstance(data.get("methods"), str):
        data["methods"] = [data["methods"]]
    if isinstance(data.get("seeds"), int):
        data["seeds"] = [data["seeds"]]
    unknown = sorted(set(data) - {f.name for f in dataclasses.fields(RecipeConfig)})
    if unknown:
        raise RecipeError(f"recipe {path}: unknown key(s) {unknown}; known keys: "
                          f"{sorted(f.name for f in dataclasses.fields(RecipeConfig))}")
    return data


def resolve_recipe(recipe_path: str | os.PathLike | None = None,
                   overrides: dict[str, Any] | None = None) -> RecipeConfig:
    """Defaults < recipe file < overrides (e.g. parsed flags; ``None`` values are ignored)."""
    values = load_recipe_file(recipe_path) if recipe_path is not None else {}
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return RecipeConfig(**values)
    except RecipeError as error:
        where = f"recipe {recipe_path}: " if recipe_path is not None else ""
        raise RecipeError(f"{where}{error}") from None
