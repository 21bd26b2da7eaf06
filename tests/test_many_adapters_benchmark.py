"""``benchmarks/many_adapters.py --quick`` runs end to end: each additional PiCa adapter costs about its ``M``
(issue 29's floor, 1.2 × ``M``), LoRA's cost grows with its ``A`` and ``B``, and the JSON is complete."""

from __future__ import annotations

from pathlib import Path

from tests.benchmark_runs import run_benchmark


def test_quick_run_meets_the_memory_floor(tmp_path: Path) -> None:
    result = run_benchmark("many_adapters.py", "--quick", "--threads", "1", out=tmp_path / "many_adapters.json")
    for kind in ("pica_full", "pica_compact"):
        loads = result["loads"][kind]
        assert set(loads["adapter_mib"]) == {"1", "3", "5"}
        assert loads["per_additional_over_m"] <= 1.2, (kind, loads)  # P is held once, not per adapter
        assert loads["adapter_mib"]["1"] > result["pica_m_mib"]  # the first adapter brings P
    lora = result["loads"]["lora"]
    assert lora["adapter_mib"]["5"] > lora["adapter_mib"]["1"] > 0
    mixed = result["mixed_batch"]
    assert mixed["tokens_per_s"]["pica"] > 0 and mixed["tokens_per_s"]["lora"] > 0 and mixed["lora_time_over_pica"] > 0
