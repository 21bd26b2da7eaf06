"""Peak memory, the projector progress bar, mean ± sd summaries, tables and plots."""

import json
import logging

import peft
import pytest
import torch

from pica import PiCaConfig
from pica.recipes import measure
from pica.recipes.results import format_table, plot_comparison, plot_loss, summarize, write_json
from tests.conftest import make_llama


def test_peak_memory_sees_a_large_temporary_allocation():
    with measure.PeakMemory(interval=0.005) as memory:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB
        block += 1
        import time

        time.sleep(0.05)
        del block
    if memory.kind == "cpu_peak_rss":
        assert memory.peak_mb > 64
    assert memory.peak_mb > 0


def test_projector_progress_counts_every_layer_and_restores_logger(monkeypatch):
    bars = []

    class FakeBar:
        def __init__(self, total, **kwargs):
            self.total, self.n = total, 0
            bars.append(self)

        def update(self, step):
            self.n += step

        def close(self):
            pass

    monkeypatch.setattr("tqdm.auto.tqdm", FakeBar)
    plan_logger = logging.getLogger("pica.tuner.plan")
    level, propagate = plan_logger.level, plan_logger.propagate
    with measure.projector_progress(True):
        model = peft.get_peft_model(make_llama(), PiCaConfig(rank=4))
    layers = sum(1 for m in model.modules() if hasattr(m, "pica_P"))
    assert len(bars) == 1 and bars[0].total == layers == bars[0].n == 10
    assert (plan_logger.level, plan_logger.propagate) == (level, propagate)
    assert not any(isinstance(h, measure._ProjectorBar) for h in plan_logger.handlers)


def _run(method, seed, accuracy, params=100):
    return {"method": method, "seed": seed, "metrics": {"accuracy": accuracy},
            "trainable_params": {"adapter": params, "head": 10, "total": params + 10},
            "train_seconds": 2.0 + seed, "wall_seconds": 3.0, "peak_memory_mb": 50.0}


def test_summary_table_and_plots(tmp_path):
    summary = summarize([_run("pica", 0, 0.7), _run("pica", 1, 0.8), _run("pica", 2, 0.9), _run("lora", 0, 0.6, 900)])
    assert summary["pica"]["metrics"]["accuracy"]["mean"] == pytest.approx(0.8)
    assert summary["pica"]["metrics"]["accuracy"]["sd"] == pytest.approx(0.1)  # sample sd
    assert summary["lora"]["metrics"]["accuracy"] == {"mean": 0.6, "sd": 0.0, "n": 1}
    assert summary["pica"]["train_seconds"]["mean"] == pytest.approx(3.0)
    table = format_table(summary, "accuracy")
    lines = table.splitlines()
    assert "accuracy" in lines[0] and lines[2].startswith("pica") and "0.800 ± 0.100" in lines[2]
    assert "110 (100 + 10)" in lines[2] and "0.600" in lines[3] and "±" not in lines[3]
    plot_comparison(summary, "accuracy", tmp_path / "c.png", "t")
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    history = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}, {"train_runtime": 1}]
    assert plot_loss(history, tmp_path / "l.png", "t")
    assert not plot_loss([{"train_runtime": 1}], tmp_path / "none.png", "t") and not (tmp_path / "none.png").exists()
    write_json(tmp_path / "r.json", summary)
    assert not list(tmp_path.glob(".*.tmp"))


def test_write_json_concurrent_writers_of_one_path_never_collide(tmp_path):
    """Two processes sharing a results directory write the same file: each write is whole, none fails."""
    import threading

    path = tmp_path / "settings.json"
    errors: list[BaseException] = []

    def writer(value: int) -> None:
        try:
            for _ in range(200):
                write_json(path, {"writer": value, "padding": "x" * 4096})
        except BaseException as error:  # noqa: BLE001 - collected and asserted below
            errors.append(error)

    threads = [threading.Thread(target=writer, args=(value,)) for value in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert json.loads(path.read_text(encoding="utf-8"))["writer"] in range(4)
    assert [p.name for p in tmp_path.iterdir()] == ["settings.json"]  # no temporary file left behind


def test_write_json_gives_the_file_the_permissions_of_any_new_file(tmp_path):
    import os
    import stat

    mask = os.umask(0o022)
    try:
        write_json(tmp_path / "results.json", {"a": 1})
        (tmp_path / "plain.txt").write_text("x")
    finally:
        os.umask(mask)
    mode = stat.S_IMODE((tmp_path / "results.json").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode) == 0o644
