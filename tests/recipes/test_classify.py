"""The classify task: reading/validating rows, labels, tokenised datasets, metrics, evaluation."""

import json
import math

import numpy as np
import pytest
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from pica.recipes.tasks import classify
from tests.harness_fixtures import save_tiny_bert, sentiment_rows, write_jsonl


def test_jsonl_csv_and_json_list_give_the_same_examples(tmp_path):
    rows = [{"sentence": "the movie was good", "label": 1}, {"sentence": "sad plot", "label": 0}]
    write_jsonl(tmp_path / "a.jsonl", rows)
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "a.csv").write_text("sentence,label\nthe movie was good,1\nsad plot,0\n")
    expected = [{"text": "the movie was good", "text_pair": None, "label": 1},
                {"text": "sad plot", "text_pair": None, "label": 0}]
    for name in ("a.jsonl", "a.json", "a.csv"):
        assert classify.load_examples(tmp_path / name) == expected, name
    assert classify.load_examples(tmp_path / "a.csv", limit=1) == expected[:1]


def test_pair_fields_detected_and_explicit(tmp_path):
    write_jsonl(tmp_path / "p.jsonl", [{"premise": "a", "hypothesis": "b", "label": "entailment"}])
    assert classify.load_examples(tmp_path / "p.jsonl") == [{"text": "a", "text_pair": "b", "label": "entailment"}]
    write_jsonl(tmp_path / "q.jsonl", [{"q": "x", "s": "y", "y": 2.5}])
    examples = classify.load_examples(tmp_path / "q.jsonl", text_fields=["q", "s"], label_field="y")
    assert examples == [{"text": "x", "text_pair": "y", "label": 2.5}]


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("bad.jsonl", '{"sentence": "ok", "label": 1}\n{"sentence": "", "label": 0}\n', r"bad.jsonl:2: .*'sentence'"),
        ("bad.jsonl", '{"sentence": "ok", "label": 1}\n\n{"sentence": "x"}\n', r"bad.jsonl:3: missing label field"),
        ("bad.jsonl", '{"sentence": "ok", "label": 1}\n{oops\n', r"bad.jsonl:2: invalid JSON"),
        ("bad.jsonl", '["sentence", 1]\n', r"bad.jsonl:1: each row must be a JSON object"),
        ("bad.csv", "sentence,label\nfine,1\ntoo,many,cols\n", r"bad.csv:3: expected 2 columns"),
        ("bad.csv", "sentence,label\nfine,\n", r"bad.csv:2: missing or empty label"),
        ("bad.json", '[{"sentence": "ok", "label": 1}, {"label": 1, "sentence": 3}]', r"bad.json\[1\]: .*'sentence'"),
        ("bad.json", '{"sentence": "ok"}', r"bad.json: a .json data file must hold a list"),
        ("bad.txt", "x", r"unsupported data file type '.txt'"),
        ("bad.jsonl", '{"words": "ok", "label": 1}\n', r"bad.jsonl:1: no text column found"),
    ],
)
def test_malformed_rows_name_file_line_and_field(tmp_path, name, content, match):
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=match):
        classify.load_examples(tmp_path / name)


def test_missing_file_and_unknown_option(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        classify.load_examples(tmp_path / "nope.jsonl")
    write_jsonl(tmp_path / "a.jsonl", sentiment_rows(2))
    with pytest.raises(ValueError, match=r"unknown task option\(s\) \['txt_fields'\]"):
        classify.load_examples(tmp_path / "a.jsonl", txt_fields=["sentence"])


def test_infer_options():
    strings = [{"text": "x", "text_pair": None, "label": label} for label in ("pos", "neg", "neutral", "neg")]
    options = classify.infer_options(strings, {})
    assert options == {"problem": "classification", "labels": ["neg", "neutral", "pos"], "num_labels": 3,
                       "metric": "accuracy"}
    scores = [{"text": "x", "text_pair": None, "label": label} for label in (0, 2.5, 5)]
    assert classify.infer_options(scores, {}) == {"problem": "regression", "labels": None, "num_labels": 1,
                                                  "metric": "pearson"}
    ints = [{"text": "x", "text_pair": None, "label": label} for label in (1, 0, 1)]
    assert classify.infer_options(ints, {"metric": "matthews"})["labels"] == [0, 1]
    with pytest.raises(ValueError, match="at least 2 classes"):
        classify.infer_options(ints[:1], {})


def test_build_train_dataset_unpadded_with_label_ids(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(save_tiny_bert(tmp_path / "bert"))
    examples = [{"text": "good", "text_pair": None, "label": "pos"},
                {"text": "the movie was very bad", "text_pair": None, "label": "neg"}]
    dataset = classify.build_train_dataset(examples, tokenizer, max_length=32, labels=["neg", "pos"])
    assert dataset["labels"] == [1, 0]
    lengths = [len(ids) for ids in dataset["input_ids"]]
    assert lengths == [3, 7] and [len(m) for m in dataset["attention_mask"]] == lengths
    with pytest.raises(ValueError, match="label 'neg' of example 1 is not among labels"):
        classify.build_train_dataset(examples, tokenizer, max_length=32, labels=["pos", "other"])
    regression = classify.build_train_dataset([{**examples[0], "label": 0.5}], tokenizer, max_length=32,
                                              problem="regression")
    assert regression["labels"] == [0.5]


def test_metrics_match_hand_computed_values():
    targets, predictions = np.array([0, 1, 1, 0, 1]), np.array([0, 1, 0, 0, 1])
    metrics = classify.compute_metrics(targets, predictions, "classification", 2)
    tp, fp, fn, tn = 2, 0, 1, 2
    assert metrics["accuracy"] == pytest.approx(4 / 5)
    assert metrics["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert metrics["matthews"] == pytest.approx(mcc)
    three = classify.compute_metrics(np.array([0, 1, 2, 2]), np.array([0, 2, 2, 2]), "classification", 3)
    assert three["f1"] == pytest.approx((1 + 0 + 0.8) / 3)  # macro F1
    regression = classify.compute_metrics(np.array([1.0, 2.0, 3.0, 4.0]), np.array([2.0, 4.1, 6.0, 100.0]),
                                          "regression", 1)
    assert regression["spearman"] == pytest.approx(1.0) and 0.7 < regression["pearson"] < 0.99


def test_evaluate_tiny_model(tmp_path):
    directory = save_tiny_bert(tmp_path / "bert")
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForSequenceClassification.from_pretrained(directory, num_labels=2)
    model.train()
    examples = classify.load_examples(write_jsonl(tmp_path / "e.jsonl", sentiment_rows(10)))
    result = classify.evaluate(model, tokenizer, examples, batch_size=3, progress=False, labels=[0, 1],
                               problem="classification", num_labels=2)
    assert model.training  # mode restored
    assert len(result["predictions"]) == 10
    correct = sum(p["correct"] for p in result["predictions"])
    assert result["metrics"]["accuracy"] == pytest.approx(correct / 10)
    assert set(result["metrics"]) == {"accuracy", "f1", "matthews"}
    # batching does not change predictions
    again = classify.evaluate(model, tokenizer, examples, batch_size=10, progress=False, labels=[0, 1],
                              problem="classification", num_labels=2)
    assert [p["prediction"] for p in again["predictions"]] == [p["prediction"] for p in result["predictions"]]


def test_evaluate_keeps_example_order_when_batching_by_length(tmp_path):
    directory = save_tiny_bert(tmp_path / "bert")
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForSequenceClassification.from_pretrained(directory, num_labels=1, problem_type="regression")
    texts = ["the movie was very good", "bad", "a very very boring plot", "nice film", "sad", "the plot is fun"]
    examples = [{"text": t, "text_pair": None, "label": float(i)} for i, t in enumerate(texts)]
    batched = classify.evaluate(model, tokenizer, examples, batch_size=4, progress=False, problem="regression")
    for example, prediction in zip(examples, batched["predictions"]):
        alone = classify.evaluate(model, tokenizer, [example, example], batch_size=1, progress=False,
                                  problem="regression")["predictions"][0]
        assert prediction["text"] == example["text"]
        assert prediction["prediction"] == pytest.approx(alone["prediction"], abs=1e-5)
