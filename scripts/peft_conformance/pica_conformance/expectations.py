"""PiCa items of peft's suite that are not expected to pass, each with its reason. Never silent.

* ``DESIGN``: the test cannot apply to PiCa by design; it runs, and is marked ``xfail(strict=True)``, so
  a test that starts passing fails the run and the entry must be removed.
* ``MIXED_BATCHES``: mixed-adapter batches (``adapter_names=`` in forward) are refused by pica with a
  clear error for now; same treatment.
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

__all__ = ["DESIGN", "ENVIRONMENT", "EXPECTATIONS", "Expectation", "MIXED_BATCHES", "match"]

DESIGN = "design"
MIXED_BATCHES = "mixed_batches"
ENVIRONMENT = "environment"


@dataclass(frozen=True)
class Expectation:
    """One entry: which items, why, and what the run does with them."""

    file: str  # peft test module stem, e.g. "test_custom_models"
    test: str  # test function name (without the parameter id)
    category: str  # DESIGN, MIXED_BATCHES or ENVIRONMENT
    reason: str
    rows: tuple[str, ...] = ()  # row test_names it applies to; empty: every PiCa row of that test
    when: Optional[Callable[[Mapping[str, Any]], bool]] = None  # further condition on the item's params

    def applies(self, file: str, test: str, params: Mapping[str, Any]) -> bool:
        if file != self.file or test != self.test:
            return False
        if self.rows and params.get("test_name") not in self.rows:
            return False
        return self.when is None or bool(self.when(params))


EXPECTATIONS: tuple[Expectation, ...] = (
)


def match(file: str, test: str, params: Mapping[str, Any],
          expectations: tuple[Expectation, ...] = EXPECTATIONS) -> Optional[Expectation]:
    """The first entry that applies to this item, or None."""
    return next((entry for entry in expectations if entry.applies(file, test, params)), None)
