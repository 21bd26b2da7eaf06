"""Adapters saved under one set of CPU kernels load under another with the same logits and ``P``.

``benchmarks/cpu_kernels.py`` runs one process per kernel setting (torch's ``ATEN_CPU_CAPABILITY``,
oneDNN's ``ONEDNN_MAX_CPU_ISA``, oneMKL's ``MKL_ENABLE_INSTRUCTIONS`` and ``MKL_CBWR``, and all of them at
their lowest together): each saves fp32 and bf16 adapters with ``projector_storage`` "full" and "compact",
then loads every adapter every process saved (9 processes, 9 × 9 × 4 loads; measured 78 s of CPU time in all,
so about 40 s on 2 idle cores, most of it importing torch, transformers and peft nine times).

A setting that changes no computation would test nothing, so each one must change at least one probe
computation on this host, or be skipped here with the reason it cannot (the skip names it: e.g. on the AMD
CPU this was written on, oneMKL reports the same generic target and computes bitwise the same whatever
``MKL_ENABLE_INSTRUCTIONS`` says, and ``avx512`` is the capability an AVX-512 host runs anyway). Measured
table: docs/cpu_kernels.md.
"""

from __future__ import annotations

import importlib.util
import platform
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64") or platform.system() != "Linux",
                       reason="the kernel choices tested (AVX2/AVX-512, oneDNN, oneMKL) are those of x86-64 Linux"),
    pytest.mark.timeout(400),
]

FP32_TOLERANCE = 1e-5
"""Largest |Δ logit| / max |logit| for fp32 (measured 2.9e-6)."""
BF16_TOLERANCE = 2.0**-5
"""Same for bf16 logits: 8 bf16 units in the last place of the largest logit (measured 2 units, 9.8e-3)."""
P_TOLERANCE = 1e-5
"""Largest |ΔP| entry of a recomputed (compact) ``P`` (measured 3.6e-7)."""


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("cpu_kernels_benchmark", ROOT / "benchmarks" / "cpu_kernels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BENCHMARK = _load_benchmark()
SETTINGS = BENCHMARK.TEST_SETTINGS


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> dict:
    result = BENCHMARK.run(SETTINGS, tmp_path_factory.mktemp("cpu_kernels"))
    assert not result["failed"], result["failed"]
    return result


def _setting(table: dict, name: str) -> dict:
    return next(entry for entry in table["settings"] if entry["setting"] == name)


def test_every_setting_saved_and_every_adapter_loaded_everywhere(table):
    assert [entry["setting"] for entry in table["settings"]] == list(SETTINGS)
    assert table["errors"] == []
    pairs = {(row["save"], row["load"], row["dtype"], row["storage"]) for row in table["loads"]}
    assert len(pairs) == len(table["loads"]) == len(SETTINGS) ** 2 * len(BENCHMARK.CASES)


def test_capability_is_recorded_and_a_request_above_the_host_falls_back(table):
    order = ["DEFAULT", "AVX2", "AVX512"]
    host = _setting(table, "host")["capability"]
    assert host == table["host"]["torch_capability"]
    for name, requested in (("aten=default", "DEFAULT"), ("aten=avx2", "AVX2"), ("aten=avx512", "AVX512")):
        recorded = _setting(table, name)["capability"]
        if host in order:
            assert recorded == order[min(order.index(requested), order.index(host))], (name, recorded, host)
    assert _setting(table, "oldest")["capability"] == "DEFAULT"


@pytest.mark.parametrize("name", SETTINGS[1:])
def test_setting_changes_a_computation_on_this_host(table, name, record_property):
    entry = _setting(table, name)
    record_property("changed_probes", entry["changed_probes"])
    if not entry["changes_computation"]:
        assert entry["no_effect_reason"], f"{name} changed no probe and no known reason explains it: {entry}"
        record_property("no_effect_reason", entry["no_effect_reason"])
        pytest.skip(f"{name} changes nothing on this host, so it tests nothing here: {entry['no_effect_reason']}")
    assert entry["changed_probes"]


def test_some_kernel_choice_moves_the_projector_and_the_fp32_logits(table):
    """The agreement below is not trivial: at least one setting computes another P and other logits."""
    moved = [e for e in table["settings"] if e["vs_host_float32"]["max_abs_dP"] > 0]
    assert moved, "no setting changed P: the cross-setting comparison would compare identical numbers"
    assert any(e["vs_host_float32"]["max_abs_dlogit"] > 0 for e in table["settings"])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_logits_agree_across_save_setting_and_load_setting(table, dtype):
    tolerance = {"float32": FP32_TOLERANCE, "bfloat16": BF16_TOLERANCE}[dtype]
    rows = [row for row in table["loads"] if row["dtype"] == dtype]
    worst = max(rows, key=lambda row: row["rel_dlogit"])
    assert worst["rel_dlogit"] <= tolerance, worst
    for entry in table["settings"]:  # a wrong P or M would be visible far above the tolerance
        for case, effect in entry["adapter_effect"].items():
            assert effect > 10 * BF16_TOLERANCE, (entry["setting"], case, effect)


def test_projector_signs_identical_across_every_setting(table):
    for row in table["loads"]:
        assert row["sign_flips"] == 0 and row["layers"] > 0, row
        if row["storage"] == "full":
            assert row["max_abs_dP"] == 0.0, row  # read from the file, bitwise
        else:
            assert row["max_abs_dP"] <= P_TOLERANCE, row  # recomputed under the load setting, aligned to the sketch
    for entry in table["settings"]:
        for dtype in ("float32", "bfloat16"):
            assert entry[f"vs_host_{dtype}"]["sign_flips"] == 0, (entry["setting"], dtype)
            assert entry[f"vs_host_{dtype}"]["max_abs_dP"] <= P_TOLERANCE, (entry["setting"], dtype)
