"""``pica train --quantize {4bit,8bit}``: adapter methods on a bitsandbytes base; full/probe/pissa refused first."""

from __future__ import annotations

import json

import pytest
import yaml

from pica.cli import main
from pica.recipes.config import RecipeConfig, RecipeError
from tests.harness_fixtures import save_tiny_bert, sentiment_rows, write_jsonl

pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("quantize")
    return {"model": save_tiny_bert(root / "bert", hidden_size=64), "train": write_jsonl(root / "train.jsonl", sentiment_rows(32)),
            "eval": write_jsonl(root / "eval.jsonl", sentiment_rows(8, seed=1))}


def _args(data, out, *extra: str) -> list[str]:
    return ["--no-progress", "train", "--model", str(data["model"]), "--train-data", str(data["train"]),
            "--eval-data", str(data["eval"]), "--rank", "4", "--lr", "0.005", "--max-steps", "2", "--batch-size", "8",
            "--max-length", "16", "--output-dir", str(out), *extra]


@pytest.mark.parametrize("quantize, method", [("4bit", "pica"), ("4bit", "lora"), ("4bit", "dora"), ("4bit", "vera"),
                                             ("8bit", "pica"), ("8bit", "lora")])
def test_adapter_methods_train_on_a_quantised_base_and_record_it(data, tmp_path, quantize, method):
    out = tmp_path / "out"
    assert main(_args(data, out, "--quantize", quantize, "--method", method)) == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["quantize"] == quantize
    run = out / method / "seed0"
    assert json.loads((run / "results.json").read_text())["quantize"] == quantize
    if method == "pica":
        recorded = json.loads((run / "adapter" / "adapter_config.json").read_text())["base_quantization"]
        assert recorded["method"] == {"4bit": "bitsandbytes_4bit", "8bit": "bitsandbytes_8bit"}[quantize]
        assert recorded.get("quant_type", "nf4") == "nf4"


@pytest.mark.parametrize("method", ["full", "probe", "pissa"])
def test_methods_that_cannot_use_a_quantised_base_are_refused_before_anything_runs(data, tmp_path, capsys, method):
    out = tmp_path / "out"
    assert main(_args(data, out, "--quantize", "4bit", "--method", "pica", method)) == 2
    assert f"quantize: method(s) ['{method}'] cannot train on a quantised base" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_per_method_quantize_is_checked_too():
    with pytest.raises(RecipeError, match=r"quantize: method\(s\) \['full'\]"):
        RecipeConfig(methods=["pica", "full"], per_method={"full": {"quantize": "8bit"}})
    recipe = RecipeConfig(methods=["pica", "full"], quantize="4bit", per_method={"full": {"quantize": None}})
    assert recipe.for_method("pica").quantize == "4bit" and recipe.for_method("full").quantize is None
    with pytest.raises(RecipeError, match=r"quantize must be one of \['4bit', '8bit'\], got '3bit'"):
        RecipeConfig(quantize="3bit")


def test_eval_of_a_quantised_run_loads_the_base_quantised_as_trained(data, tmp_path, capsys, monkeypatch):
    from pica.recipes import saved

    loaded = []
    real = saved.load_base_model
    monkeypatch.setattr(saved, "load_base_model", lambda *a, **k: loaded.append(k.get("quantize")) or real(*a, **k))
    out = tmp_path / "out"
    assert main(_args(data, out, "--quantize", "4bit", "--method", "pica")) == 0
    run = out / "pica" / "seed0"
    assert json.loads((run / "run.json").read_text())["quantize"] == "4bit"
    trained = json.loads((run / "results.json").read_text())["metrics"]
    capsys.readouterr()
    assert main(["--no-progress", "eval", str(run), "--eval-data", str(data["eval"])]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert loaded == ["4bit"]
    assert evaluated["metrics"]["accuracy"] == trained["accuracy"]
    assert evaluated["metrics"] == {k: v for k, v in trained.items() if k in evaluated["metrics"]}


def test_named_head_modules_stay_full_precision_under_quantize(tmp_path):
    from torch import nn
    from transformers import DistilBertConfig, DistilBertModel

    from pica.recipes.models import load_base_model
    from tests.harness_fixtures import save_tokenizer

    save_tokenizer(tmp_path / "distil")
    DistilBertModel(DistilBertConfig(vocab_size=32, dim=32, hidden_dim=64, n_layers=2, n_heads=4)).save_pretrained(
        tmp_path / "distil")
    model = load_base_model(str(tmp_path / "distil"), "classification", num_labels=2, quantize="4bit",
                            head_modules=["pre_classifier", "classifier"])
    assert type(model.pre_classifier) is nn.Linear and type(model.classifier) is nn.Linear  # trained in full
    assert type(model.distilbert.transformer.layer[0].attention.q_lin).__name__ == "Linear4bit"
