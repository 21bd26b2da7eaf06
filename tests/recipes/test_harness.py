"""The Trainer harness end to end on tiny models: outputs, seeds, methods, failures leave nothing."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from pica.cli import main
from pica.recipes.config import RecipeConfig, RecipeError
from pica.recipes.harness import prepare, run_experiment
from pica.recipes.tasks import get_task, register_task
from tests.harness_fixtures import (fake_generative_task, save_tiny_bert, save_tiny_llama, sentiment_rows,
                                    write_jsonl)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return {"model": str(save_tiny_bert(root / "bert")),
            "train": str(write_jsonl(root / "train.jsonl", sentiment_rows(48))),
            "eval": str(write_jsonl(root / "eval.jsonl", sentiment_rows(16, seed=1)))}


def _recipe(data, tmp_path, **overrides):
    values = dict(task="classify", model=data["model"], train_data=data["train"], eval_data=data["eval"], rank=4,
                  lr=5e-3, batch_size=8, max_steps=3, logging_steps=1, max_length=16, output_dir=str(tmp_path / "out"))
    values.update(overrides)
    return RecipeConfig(**values)


@pytest.fixture(scope="module")
def comparison(data, tmp_path_factory):
    """PiCa and LoRA, seeds 0 and 1, run once for the tests of this module."""
    tmp_path = tmp_path_factory.mktemp("comparison")
    recipe = _recipe(data, tmp_path, methods=["pica", "lora"], seeds=[0, 1])
    return run_experiment(prepare(recipe), progress=False), tmp_path


def test_two_methods_two_seeds_write_everything(comparison):
    results, tmp_path = comparison
    out = tmp_path / "out"
    for name in ("results.json", "config.yaml", "table.txt", "comparison.png"):
        assert (out / name).is_file(), name
    assert not list(tmp_path.glob(".out*"))  # no staging directory left
    runs = results["runs"]
    assert [(r["method"], r["seed"]) for r in runs] == [("pica", 0), ("pica", 1), ("lora", 0), ("lora", 1)]
    for run in runs:
        run_dir = out / run["method"] / f"seed{run['seed']}"
        for name in ("results.json", "run.json", "train_log.jsonl", "loss.png", "predictions.jsonl", "train.log",
                     "adapter/adapter_config.json"):
            assert (run_dir / name).is_file(), (run_dir, name)
        log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
        assert [e["step"] for e in log if "loss" in e] == [1, 2, 3]
        assert run["steps"] == 3 and run["trainable_params"]["head"] == 32 * 2 + 2
        assert run["peak_memory_mb"] > 0 and run["train_seconds"] > 0
        assert len((run_dir / "predictions.jsonl").read_text().splitlines()) == 16
    summary = results["summary"]
    pica_accuracies = [r["metrics"]["accuracy"] for r in runs if r["method"] == "pica"]
    assert summary["pica"]["metrics"]["accuracy"]["mean"] == pytest.approx(sum(pica_accuracies) / 2)
    spread = abs(pica_accuracies[0] - pica_accuracies[1]) / math.sqrt(2)
    assert summary["pica"]["metrics"]["accuracy"]["sd"] == pytest.approx(spread)
    assert summary["pica"]["trainable_params"]["adapter"] < summary["lora"]["trainable_params"]["adapter"]
    # PiCa's M moved away from zero, and the head was saved with the adapter
    tensors = load_file(out / "pica" / "seed0" / "adapter" / "adapter_model.safetensors")
    updates = [t for k, t in tensors.items() if k.startswith("base_model.pica_M.")]
    assert updates and all(t.abs().sum() > 0 for t in updates)
    assert any("classifier" in k for k in tensors)
    assert "pica" in (out / "table.txt").read_text() and "±" in (out / "table.txt").read_text()


def test_seeds_are_reproducible_and_different(data, comparison, tmp_path):
    first = comparison[0]
    again = run_experiment(prepare(_recipe(data, tmp_path, seeds=[0], save_model=False)), progress=False)
    assert first["runs"][0]["train_loss"] == again["runs"][0]["train_loss"]
    assert first["runs"][0]["train_loss"] != first["runs"][1]["train_loss"]


def test_pica_projectors_run_side_by_side_with_the_run_thread_count(data, tmp_path, monkeypatch):
    """``pica train`` leaves the thread count to the ``threads`` option: the projector pool runs
    ``torch.get_num_threads()`` matrices at once, as under ``get_peft_model``."""
    import pica.projector_batch as projector_batch
    from pica.projector import torch_threads

    seen: list[tuple[int, int]] = []
    real_default_workers = projector_batch._default_workers

    def spy(shapes, rank, **kwargs):
        workers = real_default_workers(shapes, rank, **kwargs)
        seen.append((torch.get_num_threads(), workers))
        return workers

    monkeypatch.setattr(projector_batch, "_default_workers", spy)
    with torch_threads(2):
        run_experiment(prepare(_recipe(data, tmp_path, max_steps=1, save_model=False)), progress=False)
        assert torch.get_num_threads() == 2
    assert seen and all(threads == 2 for threads, _ in seen)
    assert seen[0][1] == 2  # two tiny matrices fit: two at once


def test_generative_task_through_the_harness(tmp_path):
    register_task("fake_generative", fake_generative_task())
    rows = [{"question": "q good", "answer": "yes"}, {"question": "q bad", "answer": "no"}] * 4
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    recipe = RecipeConfig(task="fake_generative", model=str(save_tiny_llama(tmp_path / "llama")),
                          train_data=str(train), eval_data=str(train), methods=["pica", "dora"], rank=4, lr=1e-2,
                          batch_size=4, max_steps=2, max_length=16, max_new_tokens=2, logging_steps=1,
                          output_dir=str(tmp_path / "out"))
    results = run_experiment(prepare(recipe), progress=False)
    for run in results["runs"]:
        assert 0.0 <= run["metrics"]["accuracy"] <= 1.0 and run["steps"] == 2
        assert run["trainable_params"]["head"] == 0 and run["trainable_params"]["adapter"] > 0
        assert math.isfinite(run["train_loss"])
    config = json.loads((tmp_path / "out" / "pica" / "seed0" / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM"


def test_unavailable_and_unknown_tasks():
    register_task("ghost", "pica.recipes.tasks.ghost_not_installed")
    with pytest.raises(ValueError, match="task 'ghost' is not available"):
        get_task("ghost")
    with pytest.raises(ValueError, match=r"unknown task 'nope'; known tasks: \[.*'classify'"):
        get_task("nope")


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        ({"task": "nope"}, ValueError, "unknown task 'nope'"),
        ({"eval_data": "missing.jsonl"}, FileNotFoundError, "missing.jsonl"),
        ({"model": None}, RecipeError, "model is required"),
        ({"model": "./no/such/model"}, FileNotFoundError, "model directory not found"),
        ({"train_data": None}, RecipeError, "train_data is required"),
    ],
)
def test_bad_input_writes_nothing(data, tmp_path, overrides, error, match):
    with pytest.raises(error, match=match):
        prepare(_recipe(data, tmp_path, **overrides))
    assert list(tmp_path.iterdir()) == []


def test_malformed_row_is_reported_before_anything_is_written(data, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"sentence": "good", "label": 1}\n{"sentence": "bad"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: missing label field 'label'"):
        prepare(_recipe(data, tmp_path, eval_data=str(bad)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]


def test_existing_output_needs_overwrite_and_failed_run_keeps_old_output(data, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("old")
    with pytest.raises(FileExistsError, match="exists and is not empty; pass --overwrite"):
        prepare(_recipe(data, tmp_path))
    broken = fake_generative_task()
    original = get_task("classify")
    for name in ("TASK_KIND", "load_examples", "build_train_dataset", "infer_options"):
        setattr(broken, name, getattr(original, name))

    def failing_evaluate(*args, **kwargs):
        raise RuntimeError("evaluation exploded")

    broken.evaluate = failing_evaluate
    register_task("broken", broken)
    prepared = prepare(_recipe(data, tmp_path, task="broken", overwrite=True, save_model=False))
    with pytest.raises(RuntimeError, match="evaluation exploded"):
        run_experiment(prepared, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_full_and_probe_save_models_and_train_the_right_parameters(data, tmp_path, capsys):
    results = run_experiment(prepare(_recipe(data, tmp_path, methods=["probe", "full"], lr=1e-2)), progress=False)
    probe, full = results["runs"]
    assert probe["trainable_params"]["adapter"] == 0
    assert full["trainable_params"]["adapter"] == full["trainable_params"]["model_total"] - 66
    for method, run in (("probe", probe), ("full", full)):
        assert (tmp_path / "out" / method / "seed0" / "model" / "config.json").is_file()
        capsys.readouterr()
        assert main(["--no-progress", "eval", str(tmp_path / "out" / method / "seed0"), "--eval-data",
                     data["eval"]]) == 0
        printed = json.loads(capsys.readouterr().out)
        assert printed["kind"] == "model" and printed["metrics"] == pytest.approx(run["metrics"])


def test_a_diverged_run_is_a_failed_run_not_a_published_result(data, tmp_path):
    """Issue: ``--lr 1e30`` published NaN adapters with accuracy 0.5, ``failed: []`` and exit 0."""
    out = tmp_path / "out"
    args = ["--no-progress", "train", "--model", data["model"], "--train-data", data["train"], "--eval-data",
            data["eval"], "--method", "pica", "lora", "--rank", "4", "--max-steps", "3", "--batch-size", "8",
            "--max-length", "16", "--output-dir", str(out), "--per-method", '{"pica": {"lr": 1e30}}']
    assert main(args) == 1
    results = json.loads((out / "results.json").read_text())
    assert [f["method"] for f in results["failed"]] == ["pica"] and "diverged" in results["failed"][0]["error"]
    assert "non-finite" in (out / "pica" / "seed0" / "error.txt").read_text()
    assert not (out / "pica" / "seed0" / "adapter").exists() and (out / "lora" / "seed0" / "adapter").is_dir()


@pytest.mark.parametrize("flags, message", [(["--lr", "inf"], "lr must be a finite number"),
                                            (["--lr", "nan"], "lr must be a finite number"),
                                            (["--lr", "-1"], "lr must be > 0"),
                                            (["--seeds", "0", "0"], r"seeds: duplicates in \[0, 0\]"),
                                            (["--lora-dropout", "1.5"], r"lora_dropout must be in \[0, 1\)"),
                                            (["--scheduler", "wobbly"], "scheduler must be one of"),
                                            (["--lr-grid", "1e-3", "inf", "--lr", "auto"], "lr_grid must be")])
def test_option_values_are_refused_before_anything_loads(data, tmp_path, capsys, flags, message):
    out = tmp_path / "out"
    args = ["--no-progress", "train", "--model", "./not/loaded", "--train-data", data["train"],
            "--output-dir", str(out), *flags]
    assert main(args) == 2
    assert __import__("re").search(message, capsys.readouterr().err)
    assert not out.exists()


def test_json_boolean_labels_are_named_as_such(data, tmp_path):
    bad = tmp_path / "bool.jsonl"
    bad.write_text('{"sentence": "good", "label": true}\n')
    with pytest.raises(ValueError, match=r"bool.jsonl:1: label field 'label' is a JSON boolean \(true\)"):
        prepare(_recipe(data, tmp_path, eval_data=str(bad)))


def test_under_lr_auto_a_diverging_grid_value_is_scored_worst_not_a_failure(data, tmp_path):
    out = tmp_path / "out"
    args = ["--no-progress", "train", "--model", data["model"], "--train-data", data["train"], "--eval-data",
            data["eval"], "--method", "pica", "--rank", "4", "--max-steps", "3", "--batch-size", "8", "--max-length",
            "16", "--output-dir", str(out), "--lr", "auto", "--lr-grid", "0.005", "1e30"]
    assert main(args) == 0
    search = json.loads((out / "pica" / "seed0" / "results.json").read_text())["lr_search"]
    assert search["chosen"] == 0.005 and math.isnan(search["validation"]["1e+30"])
