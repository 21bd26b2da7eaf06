"""``benchmarks/load_walk.py`` runs end to end and measures what it says: the pica functions that run during
``get_peft_model``, ``from_pretrained``, ``load_adapter`` and a training forward (issue 26's load walk)."""

from __future__ import annotations

from pathlib import Path

from tests.benchmark_runs import run_benchmark


def test_walks_are_measured_and_the_load_starts_in_loading(tmp_path: Path) -> None:
    walks = run_benchmark("load_walk.py", out=tmp_path / "load_walk.json")["walks"]
    assert set(walks) == {"get_peft_model", "from_pretrained", "load_adapter", "training_forward_of_one_layer"}
    for walk in walks.values():
        assert walk["functions"] == len(walk["function_list"]) > 0
        assert walk["files"] == len(walk["file_list"]) == len({f.split(":")[0] for f in walk["function_list"]})
    load = set(walks["from_pretrained"]["function_list"])
    assert {"tuner/loading.py:load_checked", "tuner/loading.py:check_for_model"} <= load
    assert "tuner/loading.py:load_checked" not in walks["get_peft_model"]["function_list"]
    forward = walks["training_forward_of_one_layer"]["function_list"]
    assert "tuner/layer.py:Linear.forward" in forward and "functional.py:pica_delta" in forward
