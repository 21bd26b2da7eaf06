"""PiCa tests added to peft's test classes, as a contributor adds a method's own tests to them.

peft's ``TestRequiresGrad`` has no table: each method has its own tests (``test_requires_grad_<method>_...``)
built on the class's ``check_requires_grad`` helper and the ``MLP_2x_same_shape`` model of the module. The
PiCa ones below are written for PiCa's layout (one trainable ``M`` per role and adapter, held by the tuner:
``base_model.pica_M.<adapter>.<role>``; ``P`` is a buffer) and bound into the class after import, so they
run with peft's fixtures and helper. Each is marked as a PiCa item (:data:`MARKER`).
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

__all__ = ["MARKER", "added_tests_for", "extend_skip_helpers", "install"]

MARKER = "_pica_conformance_added"


def _m(adapter: str, *roles: str) -> list[str]:
    return [f"base_model.pica_M.{adapter}.{role}" for role in roles]


def _switch_and_disable(self: Any, peft_model: Any, first: list[str], second: list[str]) -> None:
    """The sequence of peft's per-method requires_grad tests: default active, set again, switch, disable, exit."""
    self.check_requires_grad(peft_model, *first)
    peft_model.set_adapter("default")  # setting the active adapter again changes nothing
    self.check_requires_grad(peft_model, *first)
    peft_model.set_adapter("adapter1")
    self.check_requires_grad(peft_model, *second)
    with peft_model.disable_adapter():  # nothing trainable, M included (M lives on the tuner)
        self.check_requires_grad(peft_model)
    self.check_requires_grad(peft_model, *second)


def _requires_grad_tests(module: ModuleType) -> dict[str, Callable[..., None]]:
    from pica import PiCaConfig

    get_peft_model, model_cls = module.get_peft_model, module.MLP_2x_same_shape

    def test_requires_grad_pica_different_targets(self: Any) -> None:
        peft_model = get_peft_model(model_cls(), PiCaConfig(target_modules=["lin1"], rank=2))
        peft_model.add_adapter("adapter1", PiCaConfig(target_modules=["lin2"], rank=2))
        _switch_and_disable(self, peft_model, _m("default", "lin1"), _m("adapter1", "lin2"))

    def test_requires_grad_pica_same_targets(self: Any) -> None:
        peft_model = get_peft_model(model_cls(), PiCaConfig(target_modules=["lin1", "lin2"], rank=2))
        peft_model.add_adapter("adapter1", PiCaConfig(target_modules=["lin1", "lin2"], rank=2))
        _switch_and_disable(self, peft_model, _m("default", "lin1", "lin2"), _m("adapter1", "lin1", "lin2"))

    def test_requires_grad_pica_modules_to_save_disabling(self: Any) -> None:
        peft_model = get_peft_model(model_cls(), PiCaConfig(target_modules=["lin1"], rank=2, modules_to_save=["lin3"]))
        trainable = [*_m("default", "lin1"), "base_model.model.lin3.modules_to_save.default.weight",
                     "base_model.model.lin3.modules_to_save.default.bias"]
        self.check_requires_grad(peft_model, *trainable)
        peft_model.disable_adapter_layers()
        self.check_requires_grad(peft_model)
        peft_model.enable_adapter_layers()
        self.check_requires_grad(peft_model, *trainable)
        with peft_model.disable_adapter():
            self.check_requires_grad(peft_model)
        self.check_requires_grad(peft_model, *trainable)

    return {function.__name__: function for function in (
        test_requires_grad_pica_different_targets, test_requires_grad_pica_same_targets,
        test_requires_grad_pica_modules_to_save_disabling)}


def added_tests_for(module_stem: str, module: ModuleType) -> dict[str, dict[str, Callable[..., None]]]:
    """Test class name → {test name: function} to add to that class of the peft test module."""
    if module_stem == "test_custom_models":
        return {"TestRequiresGrad": _requires_grad_tests(module)}
    return {}


def install(module_stem: str, module: ModuleType) -> int:
    """Bind the added tests into their classes (a name peft already uses is an error); return how many."""
    count = 0
    for class_name, tests in added_tests_for(module_stem, module).items():
        klass = getattr(module, class_name)
        for name, function in tests.items():
            if hasattr(klass, name):
                raise AttributeError(f"{module.__name__}.{class_name} already has {name}; peft may have added it")
            setattr(function, MARKER, True)
            function.__qualname__ = f"{class_name}.{name}"
            setattr(klass, name, function)
            count += 1
    return count


def extend_skip_helpers(module: ModuleType) -> None:
    """Add PiCa to peft's list of methods that support transformers ``Conv1D`` (GPT-2), as a contributor would.

    ``testing_common._skip_if_conv1d_not_supported`` skips every method but LoRA, IA³, LoHa and LoKr on GPT-2
    models; PiCa adapts ``Conv1D`` (its GPT-2 defaults are ``c_attn`` and ``c_fc``). The helper is wrapped
    once so that it returns for PiCa and defers to peft's for every other method.
    """
    import sys

    from pica import PiCaConfig

    common = sys.modules.get(f"{module.__package__}.testing_common") if module.__package__ else None
    original = getattr(common, "_skip_if_conv1d_not_supported", None)
    if original is None or getattr(original, MARKER, False):
        return

    def _skip_if_conv1d_not_supported(model_id: str, config_cls: type, config_kwargs: dict) -> None:
        if config_cls is PiCaConfig:
            return None
        return original(model_id, config_cls, config_kwargs)

    setattr(_skip_if_conv1d_not_supported, MARKER, True)
    common._skip_if_conv1d_not_supported = _skip_if_conv1d_not_supported
