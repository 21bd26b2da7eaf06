"""``benchmarks/train_throughput.py --quick`` runs end to end and writes well-formed JSON."""

from __future__ import annotations

import math
from pathlib import Path

from tests.benchmark_runs import run_benchmark


def test_quick_run_writes_complete_json(tmp_path: Path) -> None:
    """Every precision setting has every variant, with positive finite ratios, tokens/s and memory."""
    result = run_benchmark("train_throughput.py", "--quick", "--device", "cpu", out=tmp_path / "train_throughput.json",
                           timeout=120)
    assert result["benchmark"] == "train_throughput" and result["preset"] == "quick"
    assert set(result["results"]) == {"fp32", "autocast_bf16", "bf16"}
    expected = {"frozen_base", "pica_auto", "pica_factored", "lora_r4"}
    for precision, variants in result["results"].items():
        assert set(variants) == expected | ({"pica_factored_bf16_adapter"} if precision == "bf16" else set())
        assert variants["frozen_base"]["trainable_parameters"] == 0
        for name, entry in variants.items():
            for key in ("ratio_to_base", "tokens_per_s", "median_s"):
                assert math.isfinite(entry[key]) and entry[key] > 0, (precision, name, key, entry[key])
            assert len(entry["samples_s"]) == result["rounds"] == 2
            assert entry["memory_mib"]["total"] > 0
            if name.startswith("pica_"):
                speedup = entry["speedup_over_factored"]
                assert math.isfinite(speedup) and speedup > 0
                assert entry["form_used"] in ("merged", "factored")
        # the merged product is exact only with one dtype and no autocast
        if precision != "fp32":
            assert variants["pica_auto"]["form_used"] == "factored"
        assert variants["pica_factored"]["form_used"] == "factored"
