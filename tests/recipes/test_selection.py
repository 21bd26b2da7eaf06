"""Choices on a validation split carved from the training data: the split, lr: auto, early stopping."""

import json

import pytest

from pica.recipes.config import RecipeConfig, RecipeError
from pica.recipes.harness import prepare, run_experiment
from pica.recipes.selection import split_validation
from tests.harness_fixtures import write_jsonl

OPTIONS = {"problem": "classification", "labels": [0, 1], "num_labels": 2}


def _rows(labels):
    return [{"text": f"row {i}", "text_pair": None, "label": label} for i, label in enumerate(labels)]


def test_split_is_stratified_seeded_and_disjoint():
    examples = _rows([0] * 30 + [1] * 10)
    fit, validation = split_validation(examples, 0.25, 3, "classification", OPTIONS)
    assert (len(fit), len(validation)) == (30, 10)
    assert [e["label"] for e in validation].count(1) in (2, 3)  # stratified: a quarter of each class
    assert not {e["text"] for e in fit} & {e["text"] for e in validation}
    assert split_validation(examples, 0.25, 3, "classification", OPTIONS) == (fit, validation)
    assert split_validation(examples, 0.25, 4, "classification", OPTIONS)[1] != validation
    regression = [{"text": f"r{i}", "text_pair": None, "label": i / 7} for i in range(10)]
    assert len(split_validation(regression, 0.2, 0, "classification", {"problem": "regression"})[1]) == 2


def test_split_too_small_to_stratify_is_refused_naming_the_key():
    with pytest.raises(RecipeError, match=r"validation_fraction 0.1: cannot carve a stratified validation split "
                                          r"from 10 training examples, 2 classes, smallest with 1 example"):
        split_validation(_rows([0] * 9 + [1]), 0.1, 0, "classification", OPTIONS)


def _recipe(data, tmp_path, **overrides):
    values = dict(task="classify", model=data["model"], train_data=data["train"], eval_data=data["eval"], rank=4,
                  batch_size=8, max_length=16, logging_steps=1, save_model=False, output_dir=str(tmp_path / "out"))
    return RecipeConfig(**{**values, **overrides})


@pytest.mark.parametrize("overrides, message", [
    ({"lr": 1e-3, "lr_grid": [1e-3, 3e-3]}, "lr_grid is set but no method has lr: auto"),
    ({"validation_fraction": 0.3}, "validation_fraction is set but nothing uses a validation split"),
    ({"lr": "auto", "validation_fraction": 0.01}, "validation_fraction 0.01: cannot carve a stratified"),
    ({"early_stopping_patience": 1, "metric": "pearson"}, "metric 'pearson' cannot choose on validation"),
])
def test_preflight_refuses_before_training(data, tmp_path, overrides, message):
    with pytest.raises(RecipeError, match=message):
        prepare(_recipe(data, tmp_path, methods=["probe"], max_steps=1, **overrides))
    assert not (tmp_path / "out").exists()


def test_lr_auto_trains_each_grid_point_on_the_fit_part_and_reports_the_choice(data, tmp_path):
    recipe = _recipe(data, tmp_path, methods=["probe", "lora"], lr="auto", epochs=1,
                     per_method={"lora": {"lr_grid": [1e-6, 5e-2]}}, validation_fraction=0.25)
    results = run_experiment(prepare(recipe), progress=False)
    runs = {run["method"]: run for run in results["runs"]}
    probe, lora = runs["probe"]["lr_search"], runs["lora"]["lr_search"]
    assert probe["grid"] == [0.03, 0.09, 0.27] and lora["grid"] == [1e-6, 5e-2]
    assert (lora["fit_examples"], lora["validation_examples"], lora["metric"]) == (30, 10, "accuracy")
    assert set(lora["validation"]) == {"1e-06", "0.05"}
    for run in runs.values():
        search = run["lr_search"]
        assert run["lr"] == search["chosen"] and run["lr_source"] == "auto"
        best = max(search["validation"].values())
        assert search["validation"][f"{search['chosen']:g}"] == best
        assert run["steps"] == 5  # the final run: all 40 training examples, batch 8, 1 epoch
    assert "chosen on validation" in results["table"] and "lr auto on 10 validation examples" in results["table"]
    assert "(auto)" in results["table"]
    assert not list((tmp_path / "out").rglob("lr_search"))  # grid outputs removed


def test_early_stopping_keeps_the_best_epoch_by_validation(data, tmp_path):
    recipe = _recipe(data, tmp_path, methods=["pica"], lr=5e-2, epochs=6, early_stopping_patience=1,
                     save_model=True)
    results = run_experiment(prepare(recipe), progress=False)
    run = results["runs"][0]
    stop = run["early_stopping"]
    assert (stop["fit_examples"], stop["validation_examples"], stop["metric"]) == (32, 8, "accuracy")
    log = [json.loads(line) for line in (tmp_path / "out" / "pica" / "seed0" / "train_log.jsonl").read_text()
           .splitlines()]
    evaluations = [entry for entry in log if "eval_accuracy" in entry]
    assert len(evaluations) == stop["epochs_trained"] and len(evaluations) >= 2
    assert stop["best_metric"] == max(entry["eval_accuracy"] for entry in evaluations)
    if stop["epochs_trained"] < 6:  # stopped early: the epoch after the best did not improve
        assert evaluations[-1]["eval_accuracy"] <= stop["best_metric"]
    assert (tmp_path / "out" / "pica" / "seed0" / "adapter" / "adapter_config.json").is_file()
    assert not (tmp_path / "out" / "pica" / "seed0" / "trainer").exists()
    assert "early stopping (patience 1): best epoch" in results["table"]


def test_generative_tasks_choose_by_validation_answer_loss(tmp_path):
    from pica.recipes.tasks import register_task
    from tests.harness_fixtures import fake_generative_task, save_tiny_llama

    register_task("fake_generative", fake_generative_task())
    rows = [{"question": "q good", "answer": "yes"}, {"question": "q bad", "answer": "no"}] * 5
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    recipe = RecipeConfig(task="fake_generative", model=str(save_tiny_llama(tmp_path / "llama")),
                          train_data=str(train), eval_data=str(train), methods=["pica"], rank=4, lr="auto",
                          lr_grid=[1e-4, 3e-2], early_stopping_patience=1, epochs=2, batch_size=4, max_length=16,
                          max_new_tokens=2, eval_loss=False, save_model=False, output_dir=str(tmp_path / "out"))
    run = run_experiment(prepare(recipe), progress=False)["runs"][0]
    search, stop = run["lr_search"], run["early_stopping"]
    assert (search["metric"], search["greater_is_better"]) == ("loss", False)
    assert search["chosen"] == min(search["grid"], key=lambda lr: search["validation"][f"{lr:g}"])
    assert stop["metric"] == "loss" and stop["best_metric"] > 0
    assert (stop["fit_examples"], stop["validation_examples"]) == (8, 2)
