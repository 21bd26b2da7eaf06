"""Training / evaluation recipes: the harness behind the ``pica`` command.

``config`` (recipe fields, YAML/JSON + flags), ``tasks`` (task formats), ``methods`` (PiCa and the
peft baselines, full fine-tuning, linear probe), ``harness`` (Trainer runs, outputs), ``results``
(mean ± sd, tables, plots), ``demo`` (the offline demo).
"""

from .config import METHODS, RecipeConfig, RecipeError, resolve_recipe

__all__ = ["METHODS", "RecipeConfig", "RecipeError", "resolve_recipe"]
