"""--method features: logistic regression on the frozen model's pooled features, next to the probe."""

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

from pica.recipes.config import RecipeConfig, RecipeError
from pica.recipes.features import C_GRID, pooled_features
from pica.recipes.harness import prepare, run_experiment
from pica.recipes.tasks import classify


def _recipe(data, tmp_path, **overrides):
    values = dict(task="classify", model=data["model"], train_data=data["train"], eval_data=data["eval"],
                  batch_size=8, max_length=16, max_steps=1, save_model=False, output_dir=str(tmp_path / "out"))
    return RecipeConfig(**{**values, **overrides})


def test_pooled_features_are_the_input_of_the_classifier(data):
    model = AutoModelForSequenceClassification.from_pretrained(data["model"], num_labels=2).eval()
    tokenizer = AutoTokenizer.from_pretrained(data["model"])
    examples = classify.load_examples(data["eval"])
    dataset = classify.build_train_dataset(examples, tokenizer, max_length=16, problem="classification",
                                           labels=[0, 1])
    features = pooled_features(model, model.classifier, dataset, DataCollatorWithPadding(tokenizer), batch_size=5)
    assert features.shape == (12, 32)
    with torch.no_grad():  # the pooler output of one example alone (no padding) is the same row
        single = tokenizer(examples[3]["text"], return_tensors="pt")
        pooled = model.bert(**single).pooler_output[0].numpy()
    np.testing.assert_allclose(features[3], pooled, atol=1e-5)


def test_features_runs_next_to_the_probe_with_its_parameter_count(data, tmp_path):
    results = run_experiment(prepare(_recipe(data, tmp_path, methods=["probe", "features"])), progress=False)
    run = next(r for r in results["runs"] if r["method"] == "features")
    assert run["trainable_params"] == {"adapter": 0, "head": 32 + 1, "total": 33,
                                       "model_total": run["trainable_params"]["model_total"]}
    assert run["lr"] is None and run["steps"] == 0 and 0 <= run["metrics"]["accuracy"] <= 1
    predictions = [json.loads(line) for line in
                   (tmp_path / "out" / "features" / "seed0" / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 12
    assert run["metrics"]["accuracy"] == pytest.approx(np.mean([p["correct"] for p in predictions]))
    row = next(line for line in results["table"].splitlines() if line.startswith("features"))
    assert "33 (0 + 33)" in row and " - " in row
    assert run["regularization"]["C"] in C_GRID and run["regularization"]["cv_folds"] >= 2


def test_features_regularization_is_chosen_by_cross_validation_on_training_rows_only(data, tmp_path, monkeypatch):
    """The C grid is searched with the training rows; the eval rows never reach the fit."""
    from sklearn.model_selection import GridSearchCV

    fitted_rows = []
    real_fit = GridSearchCV.fit
    monkeypatch.setattr(GridSearchCV, "fit", lambda self, x, y, **k: fitted_rows.append(len(x))
                        or real_fit(self, x, y, **k))
    prepared = prepare(_recipe(data, tmp_path, methods=["features"]))
    run_experiment(prepared, progress=False)
    assert fitted_rows == [len(prepared.train_examples)]


@pytest.mark.parametrize("overrides, message", [
    ({"task_options": {"problem": "regression"}}, "method features .* needs a classification task"),
    ({"per_method": {"features": {"lr": 1e-3}}}, r"per_method.features: \['lr'\] do not apply to features"),
])
def test_features_refusals(data, tmp_path, overrides, message):
    with pytest.raises(RecipeError, match=message):
        prepare(_recipe(data, tmp_path, methods=["features"], **overrides))
