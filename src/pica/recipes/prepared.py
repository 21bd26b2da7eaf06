"""A comparison ready to run: the validated recipe resolved once per method, the task, its data and processor.

:func:`resolve_method` is the one place a method's settings are resolved (``per_method`` overrides, then
the default epochs and learning rate of :mod:`pica.recipes.defaults`); :class:`PreparedRun` builds a
:class:`MethodRecipe` per method of its recipe when it is made, and every step after it (pre-flight
checks, ``lr: auto``, training, the features reference) reads them from :attr:`PreparedRun.methods`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Optional

from .config import RecipeConfig
from .defaults import DEFAULT_EPOCHS, LrSource, default_lr

__all__ = ["MethodRecipe", "PreparedRun", "resolve_method"]


@dataclass(frozen=True)
class MethodRecipe:
    """One method of a comparison with everything that applies to it resolved.

    Attributes:
        method: the method (one of :data:`pica.recipes.config.METHODS`).
        recipe: the one-method recipe: ``per_method[method]`` applied, ``methods == [method]``,
            ``epochs`` and ``lr`` filled in (``lr`` stays ``"auto"`` with ``lr: auto``; ``features``, which
            has no learning rate, keeps ``lr`` as the recipe gives it).
        lr_source: where ``recipe.lr`` comes from; None for ``features``.
    """

    method: str
    recipe: RecipeConfig
    lr_source: Optional[LrSource]

    @property
    def trains(self) -> bool:
        """Whether the method takes gradient steps (every method but the ``features`` reference)."""
        return self.method != "features"


def resolve_method(recipe: RecipeConfig, method: str, task_kind: str) -> MethodRecipe:
    """``method`` of ``recipe`` for a task of kind ``task_kind`` (``"classification"``/``"generative"``).

    ``per_method[method]`` is applied (:meth:`RecipeConfig.for_method`), then what is still unset is filled
    in: ``epochs`` (:data:`pica.recipes.defaults.DEFAULT_EPOCHS` of ``task_kind``) and ``lr`` (the method's
    :func:`pica.recipes.defaults.default_lr`). ``features`` trains nothing and gets neither.
    """
    one = recipe.for_method(method)
    if method == "features":
        return MethodRecipe(method, one, None)
    if one.epochs is None:
        one = dataclasses.replace(one, epochs=DEFAULT_EPOCHS[task_kind])
    if one.lr is None:
        return MethodRecipe(method, dataclasses.replace(one, lr=default_lr(method)), "default")
    return MethodRecipe(method, one, "auto" if one.lr == "auto" else "recipe")


@dataclass
class PreparedRun:
    """A validated recipe with its task module, loaded examples and processor (a tokenizer; an image task:
    its image processor, :func:`pica.recipes.models.load_processor`).

    ``methods`` is derived from ``recipe`` when the object is made (also by ``dataclasses.replace``), so a
    prepared run whose recipe changes never holds methods resolved from the old one.
    """

    recipe: RecipeConfig
    task: ModuleType
    options: dict[str, Any]
    tokenizer: Any
    train_examples: list[dict]
    eval_examples: list[dict]
    methods: dict[str, MethodRecipe] = field(init=False, repr=False)
    """Every method of ``recipe``, resolved (:func:`resolve_method`), in the recipe's order."""

    def __post_init__(self) -> None:
        self.methods = {method: resolve_method(self.recipe, method, self.task.TASK_KIND)
                        for method in self.recipe.methods}

    @property
    def metric(self) -> str:
        """The headline metric: the recipe's, else the task's (its options), else accuracy."""
        return self.recipe.metric or self.options.get("metric") or "accuracy"

    @property
    def task_kind(self) -> str:
        """``"classification"`` or ``"generative"`` (the task's ``TASK_KIND``)."""
        return self.task.TASK_KIND

    def trained_methods(self) -> list[MethodRecipe]:
        """The resolved methods that take gradient steps (all but ``features``)."""
        return [planned for planned in self.methods.values() if planned.trains]

