"""The logic of the peft conformance plugin (scripts/peft_conformance), without downloading peft's suite."""

from __future__ import annotations

import functools
import sys
import types
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts" / "peft_conformance"))

from pica_conformance import added, expectations, plugin, standins  # noqa: E402
from pica_conformance.rows import inline_rows_for, tables_for  # noqa: E402
from pica_conformance.summary import Summary  # noqa: E402
from pica_conformance.tables import TableError, extend_inline, extend_tables, replace_values  # noqa: E402

from pica import PiCaConfig  # noqa: E402


def _module() -> types.ModuleType:
    module = types.ModuleType("fake_peft_tests")
    module.TEST_CASES = [("LoRA row", "MLP", object, {})]
    module.CONFIGS = (("cfg", {}),)
    module.UNUSED = []

    class TestThing:
        @pytest.mark.parametrize("test_name, model_id, config_cls, config_kwargs", module.TEST_CASES)
        def test_rows(self, test_name, model_id, config_cls, config_kwargs): ...

        @pytest.mark.parametrize("config_class, kwargs", module.CONFIGS)
        @pytest.mark.parametrize("other", [1, 2])
        def test_configs(self, config_class, kwargs, other): ...

    module.TestThing = TestThing
    return module


def test_extend_tables_rebinds_tables_and_rewrites_only_the_marks_that_use_them():
    module = _module()
    old_cases, old_configs = module.TEST_CASES, module.CONFIGS
    counts = extend_tables(module, {"TEST_CASES": [("PiCa row", "MLP", PiCaConfig, {})],
                                    "CONFIGS": [(PiCaConfig, {})]})
    assert counts == {"TEST_CASES": 1, "CONFIGS": 1}
    assert old_cases == [("LoRA row", "MLP", object, {})] and len(old_configs) == 1  # peft's objects untouched
    assert [row[0] for row in module.TEST_CASES] == ["LoRA row", "PiCa row"]
    assert isinstance(module.CONFIGS, tuple) and module.CONFIGS[-1] == (PiCaConfig, {})
    marks = {mark.args[0]: mark.args[1] for mark in module.TestThing.test_configs.pytestmark}
    assert marks["config_class, kwargs"] is module.CONFIGS and marks["other"] == [1, 2]
    assert module.TestThing.test_rows.pytestmark[0].args[1] is module.TEST_CASES
    with pytest.raises(TableError, match="no parametrize mark uses this table"):
        extend_tables(module, {"UNUSED": [1]})
    extend_tables(module, {}, derived={"UNUSED": [1]})  # a derived table need not be used by a mark
    with pytest.raises(TableError, match="MISSING is NoneType"):
        extend_tables(module, {"MISSING": [1]})


def test_rows_build_valid_configs_and_pica_items_are_recognised():
    required, derived = tables_for("test_custom_models")
    for name, model_id, config_cls, kwargs in required["TEST_CASES"]:
        assert config_cls is PiCaConfig and PiCaConfig(**kwargs).rank >= 1
    fast, full = tables_for("test_decoder_models")[0]["ALL_CONFIGS"], tables_for("test_decoder_models", True)[0]
    assert len(fast) == 1 and len(full["ALL_CONFIGS"]) == 2 and len(tables_for("test_custom_models", True)[0][
        "TEST_CASES"]) > len(required["TEST_CASES"])
    for config_cls, kwargs in full["ALL_CONFIGS"]:
        assert PiCaConfig(**kwargs).target_modules is None  # the model type's defaults
    for qualname, argnames, rows in inline_rows_for("test_custom_models"):
        assert qualname.startswith("Test") and rows
    assert tables_for("test_other") == ({}, {}) and inline_rows_for("test_other") == []
    assert plugin.is_pica_item({"config_cls": PiCaConfig})
    assert plugin.is_pica_item({"config_cls": functools.partial(PiCaConfig, rank=2)})
    function = lambda self: None  # noqa: E731
    assert not plugin.is_pica_item({}, function)
    setattr(function, added.MARKER, True)
    assert plugin.is_pica_item({}, function)
    assert plugin.is_pica_item({"config0": PiCaConfig(target_modules=["lin0"])})
    assert not plugin.is_pica_item({"config_cls": object, "test_name": "PiCa in a name is not enough"})


def test_expectations_match_by_file_test_and_row_and_every_one_has_a_reason():
    entry = expectations.Expectation("f", "test_x", expectations.DESIGN, "why", rows=("row A",))
    assert expectations.match("f", "test_x", {"test_name": "row A"}, (entry,)) is entry
    assert expectations.match("f", "test_x", {"test_name": "row B"}, (entry,)) is None
    assert expectations.match("g", "test_x", {"test_name": "row A"}, (entry,)) is None
    categories = {expectations.DESIGN, expectations.ENVIRONMENT}
    assert all(e.reason and e.category in categories for e in expectations.EXPECTATIONS)


def test_summary_counts_and_fails_on_failures_or_unused_expectations(tmp_path):
    summary = Summary()
    summary.record("test_a", "tests/test_a.py::t[1]", "passed")
    summary.record("test_a", "tests/test_a.py::t[2]", "xfailed", "[design] why")
    summary.deselect("test_b", "tests/test_b.py::u", expectations.ENVIRONMENT, "no hub")
    assert summary.ok
    summary.record("test_a", "tests/test_a.py::t[3]", "failed", "AssertionError")
    data = summary.to_json("cmd", {})
    assert data["per_file"]["test_a"]["passed"] == 1 and data["per_file"]["test_b"]["deselected"] == 1
    assert data["failures"] == [{"test": "tests/test_a.py::t[3]", "reason": "AssertionError", "outcome": "failed"}]
    assert data["expected_failures_by_reason"] == {"[design] why": 1} and not summary.ok
    with pytest.raises(ValueError, match="unknown outcome"):
        summary.record("test_a", "x", "passd")
    summary.write(str(tmp_path / "s.json"), "cmd", {})
    assert (tmp_path / "s.json").read_text().startswith("{")


def test_replace_values_points_marks_at_local_paths_and_keeps_the_ids():
    module = types.ModuleType("fake_decoder_tests")
    module.MODELS = ["org/tiny-A", "org/tiny-B"]

    class TestDecoder:
        @pytest.mark.parametrize("model_id", module.MODELS)
        def test_x(self, model_id): ...

    module.TestDecoder = TestDecoder
    mapping = {"org/tiny-A": "/cache/org/tiny-A", "org/tiny-B": "/cache/org/tiny-B"}
    assert replace_values(module, "MODELS", mapping, keep=["org/tiny-B"]) == 1
    assert module.MODELS == ["/cache/org/tiny-A", "/cache/org/tiny-B"]  # tests reading the table see paths
    (param,) = TestDecoder.test_x.pytestmark[0].args[1]
    assert param.values == ("/cache/org/tiny-B",) and param.id == "org/tiny-B"
    module.OTHER = ["org/unknown"]
    with pytest.raises(TableError, match="no local stand-in"):
        replace_values(module, "OTHER", mapping)
    assert standins.local_path("/cache", "org/tiny-A").endswith("org/tiny-A")
    assert all(model_id.count("/") == 1 for model_id in standins.STANDINS)
    assert set(plugin.FAST_DECODER_MODELS) <= set(standins.STANDINS)


def test_extend_inline_and_added_tests_are_bound_into_the_classes():
    module = types.ModuleType("fake_custom_tests")

    class TestThing:
        @pytest.mark.parametrize("config_cls", [object])
        def test_inline(self, config_cls): ...

    module.TestThing = TestThing
    extend_inline(module, "TestThing.test_inline", "config_cls", [PiCaConfig])
    assert TestThing.test_inline.pytestmark[0].args[1] == [object, PiCaConfig]
    with pytest.raises(TableError, match="no parametrize mark"):
        extend_inline(module, "TestThing.test_inline", "other", [1])
    with pytest.raises(TableError, match="does not exist"):
        extend_inline(module, "TestThing.test_missing", "config_cls", [1])

    module.get_peft_model = object
    module.MLP_2x_same_shape = object
    module.TestRequiresGrad = type("TestRequiresGrad", (), {})
    assert added.install("test_custom_models", module) == 3
    tests = [name for name in vars(module.TestRequiresGrad) if name.startswith("test_requires_grad_pica")]
    assert len(tests) == 3 and all(getattr(getattr(module.TestRequiresGrad, n), added.MARKER) for n in tests)
    with pytest.raises(AttributeError, match="already has"):
        added.install("test_custom_models", module)


def test_layer_indexing_expectation_applies_to_shared_m_only():
    entry = expectations.match("test_decoder_models", "test_training_decoders_layer_indexing",
                               {"config_kwargs": {"rank": 4}})
    assert entry is not None and entry.category == expectations.DESIGN
    assert expectations.match("test_decoder_models", "test_training_decoders_layer_indexing",
                              {"config_kwargs": {"rank": 4, "share_across_layers": False}}) is None
