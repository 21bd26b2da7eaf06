"""``benchmarks/train_throughput.py --quick`` runs end to end and writes well-formed JSON."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "train_throughput.py"


def test_quick_run_writes_complete_json(tmp_path: Path) -> None:
    """Every precision setting has every variant, with positive finite ratios, tokens/s and memory."""
    out = tmp_path / "train_throughput.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    completed = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--device", "cpu", "--out", str(out)],
                               check=False, env=env, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(out.read_text())
    assert json.loads(completed.stdout) == result  # stdout carries the same object
    assert result["benchmark"] == "train_throughput" and result["preset"] == "quick"
    assert "train_throughput.py" in result["machine"]["command"]
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
