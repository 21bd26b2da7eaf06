"""Issue 16, item 8: what depends only on the recipe, data and model shapes is checked before the
first training step; a run that still fails later does not throw away the finished ones."""

import json

import pytest
from transformers import Trainer

from pica.cli import main
from pica.recipes import fit
from pica.recipes.config import RecipeConfig, RecipeError, RunsFailedError
from pica.recipes.harness import prepare, run_experiment
from tests.harness_fixtures import save_tiny_bert, save_tiny_llama, sentiment_rows, write_jsonl


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return {"model": str(save_tiny_bert(root / "bert")), "root": root,
            "train": str(write_jsonl(root / "train.jsonl", sentiment_rows(24))),
            "eval": str(write_jsonl(root / "eval.jsonl", sentiment_rows(8, seed=1)))}


def _recipe(data, tmp_path, **overrides):
    values = dict(task="classify", model=data["model"], train_data=data["train"], eval_data=data["eval"], rank=4,
                  lr=5e-3, batch_size=8, max_steps=2, logging_steps=1, max_length=16, output_dir=str(tmp_path / "out"),
                  save_model=False)
    values.update(overrides)
    return RecipeConfig(**values)


@pytest.fixture
def no_training(monkeypatch):
    """Fails the test if any Trainer starts training."""
    monkeypatch.setattr(Trainer, "train", lambda *a, **k: pytest.fail("training started before the check"))


@pytest.mark.parametrize(("overrides", "match"), [
    ({"methods": ["lora", "pica"], "rank": 100}, r"method pica: PiCaConfig.rank=100 exceeds"),
    ({"methods": ["probe", "lora"], "target_modules": ["no_such_layer"]}, r"method lora: No modules were targeted"),
    ({"methods": ["lora", "pica"], "per_method": {"pica": {"target_modules": ["embeddings"]}}},
     r"method pica: .*(matched no module|supports nn.Linear)"),
    ({"methods": ["full", "pica"], "head_modules": ["nope"]}, r"method full: head_modules \['nope'\] are not top-level modules of BertForSequenceClassification"),
])
def test_a_later_method_that_cannot_run_is_refused_before_the_first_trains(data, tmp_path, no_training, overrides,
                                                                           match):
    with pytest.raises(RecipeError, match=match):
        prepare(_recipe(data, tmp_path, **overrides))
    assert not (tmp_path / "out").exists()


def test_eval_label_outside_the_training_labels_is_refused_before_training(data, tmp_path, no_training):
    rows = sentiment_rows(8, seed=2)
    rows[5]["label"] = 7
    bad = write_jsonl(tmp_path / "eval.jsonl", rows)
    with pytest.raises(ValueError, match=r"label 7 of example 5 is not among labels \[0, 1\]"):
        prepare(_recipe(data, tmp_path, eval_data=str(bad)))
    assert not (tmp_path / "out").exists()


def test_generative_model_is_checked_without_weights(tmp_path, no_training):
    from tests.harness_fixtures import fake_generative_task
    from pica.recipes.tasks import register_task

    register_task("fake_gen_preflight", fake_generative_task())
    model = save_tiny_llama(tmp_path / "llama")
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"question": "q", "answer": "yes"}] * 4)
    recipe = RecipeConfig(task="fake_gen_preflight", model=str(model), train_data=str(rows), eval_data=str(rows),
                          methods=["lora", "pica"], rank=1000, output_dir=str(tmp_path / "out"))
    with pytest.raises(RecipeError, match="method pica: PiCaConfig.rank=1000"):
        prepare(recipe)


def test_a_run_that_fails_later_keeps_the_finished_runs(data, tmp_path, monkeypatch, capsys):
    real = fit.apply_method  # the training run applies the method in pica.recipes.fit

    def lora_runs_out_of_memory(model, method, *args, **kwargs):
        if method == "lora":
            raise RuntimeError("injected: out of memory")
        return real(model, method, *args, **kwargs)

    monkeypatch.setattr(fit, "apply_method", lora_runs_out_of_memory)
    recipe = _recipe(data, tmp_path, methods=["pica", "lora", "probe"])
    with pytest.raises(RunsFailedError, match=r"1 of 3 runs failed \(lora seed 0: RuntimeError: injected") as info:
        run_experiment(prepare(recipe), progress=False)
    out = tmp_path / "out"
    results = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in results["runs"]] == ["pica", "probe"] == list(results["summary"])
    assert results["failed"] == [{"method": "lora", "seed": 0, "error": "RuntimeError: injected: out of memory"}]
    assert info.value.failed == results["failed"]
    assert "failed: lora seed 0" in (out / "table.txt").read_text()
    assert "injected: out of memory" in (out / "lora" / "seed0" / "error.txt").read_text()
    assert "Traceback" in (out / "lora" / "seed0" / "error.txt").read_text()
    assert (out / "pica" / "seed0" / "results.json").is_file()
    # the command says so and exits non-zero
    status = main(["--no-progress", "train", "--model", data["model"], "--train-data", data["train"],
                   "--eval-data", data["eval"], "--method", "pica", "lora", "--max-steps", "1", "--rank", "4",
                   "--max-length", "16", "--output-dir", str(tmp_path / "cli"), "--no-save-model"])
    assert status == 1
    assert "1 of 2 runs failed (lora seed 0" in capsys.readouterr().err
    assert json.loads((tmp_path / "cli" / "results.json").read_text())["failed"][0]["method"] == "lora"


def test_if_every_run_fails_the_error_is_raised_and_nothing_written(data, tmp_path, monkeypatch):
    def always(*args, **kwargs):
        raise RuntimeError("injected: every run fails")

    monkeypatch.setattr(fit, "apply_method", always)
    with pytest.raises(RuntimeError, match="every run fails"):
        run_experiment(prepare(_recipe(data, tmp_path, methods=["pica", "lora"])), progress=False)
    assert not (tmp_path / "out").exists()
