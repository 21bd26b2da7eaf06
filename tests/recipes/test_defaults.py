"""Per-method default learning rates: the table, how a recipe's lr wins, what a run reports."""

import json

import pytest

from pica.cli import build_parser
from pica.recipes.config import METHODS, RecipeConfig, RecipeError
from pica.recipes.defaults import DEFAULT_EPOCHS, DEFAULT_LR, LR_SOURCES, default_lr, lr_grid
from pica.recipes.harness import prepare, run_experiment
from pica.recipes.prepared import resolve_method


def test_every_trained_method_has_a_default_and_a_source():
    trained = [m for m in METHODS if m != "features"]
    assert sorted(DEFAULT_LR) == sorted(trained) and sorted(LR_SOURCES) == sorted(trained)
    assert all(value > 0 for value in DEFAULT_LR.values())
    assert DEFAULT_LR["full"] < DEFAULT_LR["lora"] < DEFAULT_LR["pica"] < DEFAULT_LR["probe"]
    with pytest.raises(KeyError, match="no default learning rate for method 'sgd'"):
        default_lr("sgd")


def test_lr_unset_takes_the_methods_default_and_an_explicit_one_wins():
    recipe = RecipeConfig(methods=["pica", "full", "lora"], per_method={"full": {"lr": 5e-5}})
    assert recipe.lr is None
    pica = resolve_method(recipe, "pica", "classification")
    assert (pica.recipe.lr, pica.lr_source) == (DEFAULT_LR["pica"], "default")
    full = resolve_method(recipe, "full", "classification")
    assert (full.recipe.lr, full.lr_source) == (5e-5, "recipe")
    explicit = RecipeConfig(methods=["lora"], lr=2e-4)
    assert resolve_method(explicit, "lora", "classification").recipe.lr == 2e-4
    auto = RecipeConfig(methods=["lora"], lr="auto")
    resolved = resolve_method(auto, "lora", "generative")
    assert (resolved.recipe.lr, resolved.lr_source) == ("auto", "auto")


def test_epochs_unset_take_the_task_kinds_default_and_an_explicit_one_wins():
    recipe = RecipeConfig(methods=["pica", "full"], per_method={"full": {"epochs": 2}})
    assert recipe.epochs is None
    assert resolve_method(recipe, "pica", "classification").recipe.epochs == DEFAULT_EPOCHS["classification"]
    assert resolve_method(recipe, "pica", "generative").recipe.epochs == DEFAULT_EPOCHS["generative"] == 1.0
    assert resolve_method(recipe, "full", "classification").recipe.epochs == 2.0
    with pytest.raises(RecipeError, match="epochs must be > 0, got 0.0"):
        RecipeConfig(epochs=0)


def test_lr_accepts_a_number_or_auto_only():
    assert RecipeConfig(lr=1).lr == 1.0
    with pytest.raises(RecipeError, match=r"lr must be a number or one of \['auto'\], got 'fast'"):
        RecipeConfig(lr="fast")
    with pytest.raises(RecipeError, match=r"lr must be > 0 \(or 'auto'\), got -0.001"):
        RecipeConfig(lr=-1e-3)
    with pytest.raises(RecipeError, match="lr_grid must be at least 2 finite positive numbers"):
        RecipeConfig(lr="auto", lr_grid=[1e-3, 0])
    with pytest.raises(RecipeError, match="lr_grid: duplicates"):
        RecipeConfig(lr="auto", lr_grid=[1e-3, 1e-3])
    assert lr_grid("lora") == [0.000333, 0.001, 0.003]
    assert lr_grid("lora", [1e-4, 2e-4]) == [1e-4, 2e-4]


def test_lr_flags_parse_a_number_auto_and_a_grid():
    parser = build_parser()
    assert parser.parse_args(["train", "--lr", "3e-4"]).lr == 3e-4
    args = parser.parse_args(["train", "--lr", "auto", "--lr-grid", "1e-4", "3e-4", "1e-3"])
    assert (args.lr, args.lr_grid) == ("auto", [1e-4, 3e-4, 1e-3])
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--lr", "fast"])


def test_the_lr_used_is_in_the_table_results_and_each_run(data, tmp_path):
    recipe = RecipeConfig(task="classify", model=data["model"], train_data=data["train"], eval_data=data["eval"],
                          methods=["probe", "pica"], per_method={"pica": {"lr": 2e-3}}, rank=4, batch_size=8,
                          max_steps=2, max_length=16, save_model=False, output_dir=str(tmp_path / "out"))
    results = run_experiment(prepare(recipe), progress=False)
    by_method = {run["method"]: run for run in results["runs"]}
    assert (by_method["probe"]["lr"], by_method["probe"]["lr_source"]) == (DEFAULT_LR["probe"], "default")
    assert (by_method["pica"]["lr"], by_method["pica"]["lr_source"]) == (2e-3, "recipe")
    assert by_method["pica"]["epochs"] == DEFAULT_EPOCHS["classification"] and by_method["pica"]["steps"] == 2
    assert results["summary"]["probe"]["lr"] == [DEFAULT_LR["probe"]]
    lines = results["table"].splitlines()
    assert "lr" in lines[0].split()
    assert f"{DEFAULT_LR['probe']:.2g} (default)" in lines[2] and "0.002 (recipe)" in lines[3]
    run_file = json.loads((tmp_path / "out" / "probe" / "seed0" / "results.json").read_text())
    assert run_file["lr"] == DEFAULT_LR["probe"]
    history = [json.loads(line) for line in (tmp_path / "out" / "pica" / "seed0" / "train_log.jsonl").read_text()
               .splitlines()]
    assert max(entry["learning_rate"] for entry in history if "learning_rate" in entry) <= 2e-3
