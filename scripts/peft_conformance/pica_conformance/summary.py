"""Outcome bookkeeping of the conformance run and its JSON summary."""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Summary"]

OUTCOMES = ("passed", "failed", "error", "skipped", "xfailed", "xpassed_strict")


@dataclass
class Summary:
    """Counts per peft test file, the failures with one-line reasons, and what was left out and why."""

    counts: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    failures: list[dict[str, str]] = field(default_factory=list)
    expected: list[dict[str, str]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    deselected: list[dict[str, str]] = field(default_factory=list)
    not_pica: Counter = field(default_factory=Counter)
    unused_expectations: list[dict[str, str]] = field(default_factory=list)

    def record(self, file: str, nodeid: str, outcome: str, reason: str = "") -> None:
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}")
        self.counts[file][outcome] += 1
        entry = {"test": nodeid, "reason": reason}
        if outcome in ("failed", "error", "xpassed_strict"):
            self.failures.append({**entry, "outcome": outcome})
        elif outcome == "xfailed":
            self.expected.append(entry)
        elif outcome == "skipped":
            self.skipped.append(entry)

    def deselect(self, file: str, nodeid: str, category: str, reason: str) -> None:
        self.counts[file]["deselected"] += 1
        self.deselected.append({"test": nodeid, "category": category, "reason": reason})

    @property
    def ok(self) -> bool:
        return not self.failures and not self.unused_expectations

    def to_json(self, command: str, versions: dict[str, str], contract: str = "fast") -> dict[str, Any]:
        by_reason = Counter(entry["reason"] for entry in self.expected)
        per_file = {file: {key: counts.get(key, 0) for key in (*OUTCOMES, "deselected")}
                    for file, counts in sorted(self.counts.items())}
        totals = {key: sum(row[key] for row in per_file.values()) for key in (*OUTCOMES, "deselected")}
        return {
            "command": command,
            "contract": contract,
            "versions": versions,
            "per_file": per_file,
            "total": totals,
            "not_pica_items_deselected": dict(sorted(self.not_pica.items())),
            "failures": self.failures,
            "expected_failures_by_reason": dict(by_reason.most_common()),
            "expected_failures": self.expected,
            "skipped_by_peft": self.skipped,
            "deselected": self.deselected,
            "unused_expectations": self.unused_expectations,
        }

    def write(self, path: str, command: str, versions: dict[str, str], contract: str = "fast") -> None:
        """Write the summary atomically (a temporary file in the same directory, then rename)."""
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=directory, delete=False, suffix=".tmp") as handle:
            json.dump(self.to_json(command, versions, contract), handle, indent=1)
            handle.write("\n")
        os.replace(handle.name, path)
