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

from functools import partial
from typing import Any

import pytest

__all__ = ["inline_rows_for", "tables_for"]


def _custom_model_rows(config_cls: type, full: bool) -> list[tuple[str, str, type, dict[str, Any]]]:
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
    if full:  # PiCa's own options through the whole contract, and the linear heads of peft's other models
        both = {"target_modules": ["lin0", "lin1"], "rank": 2}
        rows += [
            ("Vanilla MLP 8 PiCa regex", "MLP", config_cls, {"target_modules": r"lin\d", "rank": 2}),
            ("Vanilla MLP 9 PiCa factored", "MLP", config_cls, {**both, "forward_mode": "factored"}),
            ("Vanilla MLP 11 PiCa compact projector", "MLP", config_cls, {**both, "projector_storage": "compact"}),
            ("Vanilla MLP 12 PiCa random subspace", "MLP", config_cls, {**both, "subspace": "random"}),
            ("Conv2d 1 PiCa", "Conv2d", config_cls, {"target_modules": ["lin0"], "rank": 2}),
            ("MHA 1 PiCa", "MHA", config_cls, {"target_modules": ["lin0"], "rank": 2}),
        ]
    return rows


def _multiple_active_rows(config_cls: type) -> list[tuple[str, str, type, dict[str, Any], dict[str, Any]]]:
    lin0 = {"target_modules": ["lin0"], "rank": 2, "init_weights": False}
    lin1 = {"target_modules": ["lin1"], "rank": 2, "init_weights": False}
    return [("PiCa Same", "pica", config_cls, lin0, dict(lin0)), ("PiCa Different", "pica", config_cls, lin0, lin1)]


def _mixed_batch_rows(config_cls: type) -> list[tuple[str, Any, Any]]:
    return [("PiCa mixed adapter", config_cls(target_modules=["lin0"], rank=2, init_weights=False),
             config_cls(target_modules=["lin0"], rank=4, init_weights=False))]


def _custom_inline_rows(config_cls: type) -> list[tuple[str, str, list[Any]]]:
    def pica(targets: list[str], rank: int = 2, **kwargs: Any) -> Any:
        return config_cls(target_modules=targets, rank=rank, init_weights=False, **kwargs)

    # peft's rows shrink the rank of a method whose default does not fit the MLP with partial(config_cls, r=...)
    small_rank = pytest.param(partial(config_cls, rank=2), id="PiCaConfig")
    mixed = "TestMixedAdapterBatches.test_mixed_adapter_batches_"
    return [
        ("TestPeftCustomModel.test_multiple_adapters_mixed_modules_to_save", "config_cls", [small_rank]),
        ("TestPeftCustomModel.test_multiple_adapters_mixed_modules_to_save_order_switched", "config_cls", [small_rank]),
        ("TestPeftCustomModel.test_adapter_name_makes_no_difference", "config0", [pica(["lin0"])]),
        (mixed + "different_target_layers", "test_name, config0, config1",
         [("PiCa mixed adapter with different target layers", pica(["lin0"]), pica(["lin1"]))]),
        (mixed + "multiple_modules_to_save", "test_name, config0, config1",
         [("PiCa mixed adapter with modules to save", pica(["lin0"], modules_to_save=["lin1"]),
           pica(["lin0"], modules_to_save=["lin1"]))]),
        (mixed + "unsupported_layer_raises", "test_name, config0, config1",
         [("PiCa mixed adapter with unsupported layer", pica(["lin0"], modules_to_save=["gru"]),
           pica(["lin0"], modules_to_save=["gru"]))]),
        (mixed + "partly_overlapping_target_layers", "test_name, config0, config1",
         [("PiCa mixed adapter with overlapping layers", pica(["lin0"]), pica(["lin0", "lin1"]))]),
        (mixed + "lora_conv1d_emb", "test_name, config0, config1",  # PiCa adapts the Conv1D, not the embedding
         [("PiCa mixed adapter with conv1d", pica(["conv1d"], rank=1), pica(["conv1d"], rank=1))]),
        (mixed + "lora_conv1d_emb_multiple_modules_to_save", "test_name, config0, config1",
         [("PiCa mixed adapter with conv1d and modules to save", pica(["conv1d"], rank=1, modules_to_save=["lin0"]),
           pica(["conv1d"], rank=1, modules_to_save=["lin0"]))]),
        (mixed + "lora_wrong_adapter_name_raises", "test_name, config",
         [("PiCa mixed batch wrong adapter name", pica(["lin0"]))]),
        ("TestDefaultTargetModules.test_default_target_modules_not_set_raises", "config_cls", [config_cls]),
        ("TestDefaultTargetModules.test_default_target_modules_not_set_model_type_set_raises", "config_cls",
         [config_cls]),
    ]


def inline_rows_for(module_stem: str) -> list[tuple[str, str, list[Any]]]:
    """(test qualname, parametrize argnames, PiCa rows) for the tests of one peft file whose rows are inline."""
    from pica import PiCaConfig

    if module_stem == "test_custom_models":
        return _custom_inline_rows(PiCaConfig)
    return []


def _decoder_rows(config_cls: type, full: bool) -> list[tuple[type, dict[str, Any]]]:
    # target_modules=None: PiCa's defaults for the model type (q/k/v and MLP up/down projections; GPT-2's
    # Conv1D c_attn, c_fc). Rank 4 fits every adapted matrix of the stand-ins (OPT's fc1 is 16 -> 4).
    rows = [(config_cls, {"task_type": "CAUSAL_LM", "target_modules": None, "rank": 4})]
    if full:  # one M per layer: peft's layer-indexing count applies
        rows.append((config_cls, {"task_type": "CAUSAL_LM", "target_modules": None, "rank": 4,
                                  "share_across_layers": False}))
    return rows


def tables_for(module_stem: str, full: bool = False) -> tuple[dict[str, list[Any]], dict[str, list[Any]]]:
    """(tables that must be used by a parametrize mark, derived tables) → PiCa rows, for one peft test file.

    ``full``: the full contract (more rows); the default is the fast set of ``scripts/test.sh``.
    Returns two empty dicts for a file without PiCa rows.
    """
    from pica import PiCaConfig

    if module_stem == "test_custom_models":
        return ({"TEST_CASES": _custom_model_rows(PiCaConfig, full),
                 "MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES": _multiple_active_rows(PiCaConfig),
                 "MIXED_ADAPTER_TEST_CASES": _mixed_batch_rows(PiCaConfig)},
                {"ALL_PEFT_CONFIG_CLASSES": [PiCaConfig]})
    if module_stem == "test_decoder_models":
        return {"ALL_CONFIGS": _decoder_rows(PiCaConfig, full)}, {}
    if module_stem == "test_config":
        return ({"ALL_CONFIG_CLASSES": [(PiCaConfig, {})]},
                {"LAYER_INDEXING_CONFIG_CLASSES": [(PiCaConfig, {})]})
    return {}, {}
