"""The PiCa rows added to peft's test tables, as a contributor would add them to peft's test files.

Models (defined in peft's ``tests/test_custom_models.py``): ``MLP`` (``lin0`` 10→20, ``lin1`` 20→2),
``MLP_LayerNorm`` (the same with LayerNorms), ``EmbConv1D`` (an embedding and a transformers ``Conv1D``
``conv1d`` 5→1 before ``lin0`` 10→2) and ``Conv1d`` (an ``nn.Conv1d`` before ``lin0`` 9→2). PiCa adapts
``nn.Linear`` and transformers ``Conv1D``; ``rank ≤ min(in, out)`` of every target. As for peft's methods,
``TEST_CASES`` rows keep the default init (``M = 0``, identity) and the tests that need an adapter that
changes the output switch it off themselves (``set_init_weights_false``: ``init_weights=False``, a small
random ``M``); the multi-adapter tables set ``init_weights=False`` in the rows, as peft's own rows do.
"""

from __future__ import annotations

from typing import Any

__all__ = ["tables_for"]


def _custom_model_rows(config_cls: type) -> list[tuple[str, str, type, dict[str, Any]]]:
    rows: list[tuple[str, str, type, dict[str, Any]]] = [
        ("Vanilla MLP 1 PiCa", "MLP", config_cls, {"target_modules": "lin0", "rank": 2}),
        ("Vanilla MLP 2 PiCa", "MLP", config_cls, {"target_modules": ["lin0"], "rank": 2}),
        ("Vanilla MLP 3 PiCa", "MLP", config_cls, {"target_modules": ["lin1"], "rank": 2}),
        ("Vanilla MLP 4 PiCa", "MLP", config_cls, {"target_modules": ["lin0", "lin1"], "rank": 2}),
        ("Vanilla MLP 5 PiCa", "MLP", config_cls,
         {"target_modules": ["lin0"], "rank": 2, "modules_to_save": ["lin1"]}),
        ("Vanilla MLP 6 PiCa", "MLP", config_cls,
         {"target_modules": ["lin0", "lin1"], "rank": 2, "share_across_layers": False}),
        ("Vanilla MLP 7 PiCa", "MLP_LayerNorm", config_cls,
         {"target_modules": ["lin0", "lin1"], "rank": 2, "modules_to_save": ["layernorm0"]}),
        ("Embedding + transformers Conv1D 1 PiCa", "EmbConv1D", config_cls, {"target_modules": ["conv1d"], "rank": 1}),
        ("Conv1d + Linear 1 PiCa", "Conv1d", config_cls, {"target_modules": ["lin0"], "rank": 2}),
    ]
    return rows


def _multiple_active_rows(config_cls: type) -> list[tuple[str, str, type, dict[str, Any], dict[str, Any]]]:
    lin0 = {"target_modules": ["lin0"], "rank": 2, "init_weights": False}
    lin1 = {"target_modules": ["lin1"], "rank": 2, "init_weights": False}
    return [("PiCa Same", "pica", config_cls, lin0, dict(lin0)), ("PiCa Different", "pica", config_cls, lin0, lin1)]


def _mixed_batch_rows(config_cls: type) -> list[tuple[str, Any, Any]]:
    return [("PiCa mixed adapter", config_cls(target_modules=["lin0"], rank=2, init_weights=False),
             config_cls(target_modules=["lin0"], rank=4, init_weights=False))]


def tables_for(module_stem: str) -> tuple[dict[str, list[Any]], dict[str, list[Any]]]:
    """(tables that must be used by a parametrize mark, derived tables) → PiCa rows, for one peft test file.

    Returns two empty dicts for a file without PiCa rows.
    """
    from pica import PiCaConfig

    if module_stem == "test_custom_models":
        return ({"TEST_CASES": _custom_model_rows(PiCaConfig),
                 "MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES": _multiple_active_rows(PiCaConfig),
                 "MIXED_ADAPTER_TEST_CASES": _mixed_batch_rows(PiCaConfig)},
                {"ALL_PEFT_CONFIG_CLASSES": [PiCaConfig]})
    if module_stem == "test_config":
        return ({"ALL_CONFIG_CLASSES": [(PiCaConfig, {})]},
                {"LAYER_INDEXING_CONFIG_CLASSES": [(PiCaConfig, {})]})
    return {}, {}
