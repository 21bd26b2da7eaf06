"""PiCa items of peft's suite that are not expected to pass, each with its reason. Never silent.

* ``DESIGN``: the test cannot apply to PiCa by design; it runs, and is marked ``xfail(strict=True)``, so
  a test that starts passing fails the run and the entry must be removed.
* ``ENVIRONMENT``: cannot run here (no model hub, no GPU): deselected, listed in the summary with the
  reason, and never counted as a pass.

Entries match on the peft test file, the test function name and, optionally, the row's ``test_name``
(the first parameter of a table row) or a predicate on the item's parameters. An entry that matches no
item is reported as unused (the summary's ``unused_expectations``) and fails the run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Optional

__all__ = ["DESIGN", "ENVIRONMENT", "EXPECTATIONS", "Expectation", "match"]

DESIGN = "design"
ENVIRONMENT = "environment"


@dataclass(frozen=True)
class Expectation:
    """One entry: which items, why, and what the run does with them."""

    file: str  # peft test module stem, e.g. "test_custom_models"
    test: str  # test function name (without the parameter id)
    category: str  # DESIGN or ENVIRONMENT
    reason: str
    rows: tuple[str, ...] = ()  # row test_names it applies to; empty: every PiCa row of that test
    when: Optional[Callable[[Mapping[str, Any]], bool]] = None  # further condition on the item's params

    def applies(self, file: str, test: str, params: Mapping[str, Any]) -> bool:
        if file != self.file or test != self.test:
            return False
        if self.rows and params.get("test_name") not in self.rows:
            return False
        return self.when is None or bool(self.when(params))


_CUSTOM, _CONFIG, _DECODER = "test_custom_models", "test_config", "test_decoder_models"
_NO_PICKLE = ("PiCa adapters are written as safetensors only (no pickle, DESIGN §3): save_pretrained("
              "safe_serialization=False) warns and writes adapter_model.safetensors, so there is no adapter_model.bin")
_OTHER_BASE = ("the test builds the base model twice without a seed, so the adapter is loaded onto other base "
               "weights; PiCa refuses that by design (P is the saved base's singular basis; the fingerprint check "
               "raises AdapterFileError naming the module)")
_UNKNOWN_KEYS = ("PiCa refuses unknown adapter_config.json keys (TypeError naming them, README guarantee) instead "
                 "of peft's forward-compatibility filter that warns and drops them: a newer PiCa adapter must not "
                 "load with a silently different meaning")
_SHARED_M = ("one M per role shared across the layers (share_across_layers=True, the method's default): "
             "layers_to_transform=[0] adapts fewer layers but trains the same number of tensors (one M per role), "
             "so peft's check that it trains fewer parameter tensors cannot hold; peft skips this test for VeRA, "
             "VBLoRA and UniLoRA for the same reason (shared weights). Passes with share_across_layers=False")


def _shared(params: Mapping[str, Any]) -> bool:
    return bool(params.get("config_kwargs", {}).get("share_across_layers", True))


_HUB = "needs the Hugging Face Hub (peft-internal-testing/tiny-opt-lora-revision); the run is offline"

EXPECTATIONS: tuple[Expectation, ...] = (
    Expectation(_CUSTOM, "test_save_pretrained_pickle", DESIGN, _NO_PICKLE),
    Expectation(_CUSTOM, "test_loading_model_requires_grad_set_correctly", DESIGN, _OTHER_BASE),
    Expectation(_CUSTOM, "test_loading_model_with_modules_to_save_requires_grad_set_correctly", DESIGN, _OTHER_BASE),
    Expectation(_DECODER, "test_save_pretrained_pickle", DESIGN, _NO_PICKLE),
    Expectation(_DECODER, "test_save_pretrained_selected_adapters_pickle", DESIGN, _NO_PICKLE),
    Expectation(_DECODER, "test_training_decoders_layer_indexing", DESIGN, _SHARED_M, when=_shared),
    Expectation(_CONFIG, "test_from_pretrained_forward_compatible", DESIGN, _UNKNOWN_KEYS),
    Expectation(_CONFIG, "test_from_pretrained_forward_compatible_load_from_peft_config", DESIGN, _UNKNOWN_KEYS),
    Expectation(_CONFIG, "test_from_pretrained_sanity_check", DESIGN,
                _UNKNOWN_KEYS + "; the same TypeError, but it names the unknown keys rather than the missing "
                "peft_type peft's message (matched by the test) names"),
    Expectation(_CONFIG, "test_from_pretrained", ENVIRONMENT, _HUB),
    Expectation(_CONFIG, "test_from_pretrained_cache_dir", ENVIRONMENT, _HUB),
    Expectation(_CONFIG, "test_save_pretrained_with_runtime_config", ENVIRONMENT, _HUB),
)


def match(file: str, test: str, params: Mapping[str, Any],
          expectations: tuple[Expectation, ...] = EXPECTATIONS) -> Optional[Expectation]:
    """The first entry that applies to this item, or None."""
    return next((entry for entry in expectations if entry.applies(file, test, params)), None)
