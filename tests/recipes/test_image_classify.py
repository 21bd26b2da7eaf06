"""``--task image-classify`` end to end on tiny random DINOv2 / ViT models and generated images."""

import json

import pytest
import torch

from pica.cli import main
from pica.recipes.config import METHODS, RecipeConfig, RecipeError
from pica.recipes.harness import prepare, run_experiment
from pica.recipes.models import load_base_model
from tests.recipes.image_fixtures import save_tiny_vision_model, write_folder, write_table


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("vision")
    return {"dinov2": str(save_tiny_vision_model(root / "dinov2")),
            "vit": str(save_tiny_vision_model(root / "vit", kind="vit")),
            "train": str(write_folder(root / "train", 24)),
            "eval": str(write_table(root / "eval.csv", write_folder(root / "eval_images", 8, start=100)))}


def _recipe(data, tmp_path, **overrides):
    values = dict(task="image-classify", model=data["dinov2"], train_data=data["train"], eval_data=data["eval"],
                  rank=4, batch_size=8, max_steps=2, logging_steps=1, task_options={"size": 16},
                  output_dir=str(tmp_path / "out"))
    values.update(overrides)
    return RecipeConfig(**values)


@pytest.fixture(scope="module")
def every_method(data, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("every_method")
    return run_experiment(prepare(_recipe(data, tmp_path, methods=list(METHODS))), progress=False), tmp_path


def test_every_method_trains_and_reports(every_method):
    results, _ = every_method
    runs = {run["method"]: run for run in results["runs"]}
    assert set(runs) == set(METHODS) and not results["failed"]
    head = 2 * 32 * 2 + 2  # classifier over [CLS; mean patch] (2 × hidden) → 2 classes
    assert all(runs[m]["trainable_params"]["head"] == head for m in METHODS if m != "features")
    # PiCa: rank × Σ out_features over the 6 roles (q, k, v, o: 32; fc1: 64; fc2: 32), shared across the 2 layers
    assert runs["pica"]["trainable_params"]["adapter"] == 4 * (4 * 32 + 64 + 32)
    assert runs["probe"]["trainable_params"]["adapter"] == 0
    assert runs["features"]["trainable_params"]["head"] == 32 * 2 * 2 // 2 + 1  # one logistic-regression row (binary)
    for run in runs.values():
        assert 0.0 <= run["metrics"]["accuracy"] <= 1.0 and set(run["metrics"]) == {"accuracy", "f1", "matthews"}
    assert results["metric"] == "accuracy"


def test_predictions_name_images_and_saved_runs_evaluate_the_same(every_method, data, capsys):
    results, tmp_path = every_method
    runs = {run["method"]: run for run in results["runs"]}
    records = [json.loads(line) for line in (tmp_path / "out" / "pica" / "seed0" / "predictions.jsonl").open()]
    assert len(records) == 8 and set(records[0]) == {"image", "target", "prediction", "correct"}
    assert records[0]["image"].endswith(".png")
    run_json = json.loads((tmp_path / "out" / "pica" / "seed0" / "run.json").read_text())
    assert run_json["task_options"]["size"] == 16 and run_json["task_options"]["labels"] == ["dots", "stripes"]
    for method, saved in (("pica", "adapter"), ("lora", "adapter"), ("full", "model")):
        capsys.readouterr()
        assert main(["--no-progress", "eval", str(tmp_path / "out" / method / "seed0"), "--eval-data",
                     data["eval"]]) == 0
        printed = json.loads(capsys.readouterr().out)
        assert printed["kind"] == saved and printed["metrics"] == pytest.approx(runs[method]["metrics"]), method


def test_vit_through_the_command_line(data, tmp_path, capsys):
    out = tmp_path / "vit_out"
    assert main(["--no-progress", "train", "--task", "image-classify", "--model", data["vit"], "--train-data",
                 data["train"], "--eval-data", data["eval"], "--method", "pica", "probe", "--rank", "2",
                 "--max-steps", "2", "--batch-size", "8", "--task-options", '{"size": 12}',
                 "--output-dir", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in results["runs"]] == ["pica", "probe"]
    assert "pica" in capsys.readouterr().out


def test_lr_auto_chooses_on_held_out_images(data, tmp_path):
    recipe = _recipe(data, tmp_path, methods=["probe"], lr="auto", lr_grid=[0.01, 0.1], max_steps=1)
    run = run_experiment(prepare(recipe), progress=False)["runs"][0]
    assert run["lr_source"] == "auto" and run["lr_search"]["validation_examples"] == 5
    assert run["lr"] in (0.01, 0.1)


def test_bad_targets_and_unknown_labels_fail_before_training(data, tmp_path):
    with pytest.raises(RecipeError, match="method pica: .*nope"):
        prepare(_recipe(data, tmp_path, methods=["pica"], target_modules=["nope"]))
    (tmp_path / "e.csv").write_text(f"image,label\n{data['train']}/dots/1.png,circles\n")
    with pytest.raises(ValueError, match=r"e.csv:2: label 'circles' .* not among the training labels"):
        prepare(_recipe(data, tmp_path, eval_data=str(tmp_path / "e.csv")))
    with pytest.raises(ValueError, match="gguf_file applies to text models"):
        prepare(_recipe(data, tmp_path, gguf_file="x.gguf"))
    assert not (tmp_path / "out").exists()


def test_new_head_replaces_a_head_of_another_size(data, tmp_path):
    model = load_base_model(data["dinov2"], "classification", num_labels=5, modality="image")
    model.save_pretrained(tmp_path / "five")
    torch.manual_seed(0)
    reloaded = load_base_model(str(tmp_path / "five"), "classification", num_labels=3, modality="image")
    assert reloaded.classifier.out_features == 3
