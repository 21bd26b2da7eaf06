"""Commonsense task (LLM-Adapters format): label-word extraction, task resolution, loading, evaluate()."""

from __future__ import annotations

import json

import pytest
from tests.recipes.generative_fixtures import ScriptedModel, bpe_tokenizer, tiny_llama

from pica.recipes.tasks import commonsense
from pica.recipes.tasks.generative import IGNORE_INDEX

# A few synthetic rows per task, in the shape of the LLM-Adapters test files.
SYNTHETIC = {
    "boolq": [("Please answer the following question with true or false. Question: is water wet?", "true"),
              ("Please answer the following question with true or false. Question: is fire cold?", "false")],
    "piqa": [("Goal: open a jar. Solution1: twist the lid. Solution2: eat the jar.", "solution1"),
             ("Goal: dry hair. Solution1: use water. Solution2: use a towel.", "solution2")],
    "social_i_qa": [("Alex gave a gift. How does Alex feel? Answer1: sad Answer2: kind Answer3: angry", "answer2")],
    "hellaswag": [("A man climbs a ladder. Ending1: he flies Ending2: he sings Ending3: he reaches the roof "
                   "Ending4: he sleeps", "ending3")],
    "winogrande": [("The cup fell off the table because _ was unstable. Option1: cup Option2: table", "option2")],
    "ARC-Easy": [("Which is a mammal? Answer1: shark Answer2: whale Answer3: trout Answer4: eel", "answer2")],
    "ARC-Challenge": [("Which gas do plants absorb? Answer1: oxygen Answer2: helium Answer3: carbon dioxide "
                       "Answer4: neon", "answer3")],
    "openbookqa": [("The sun is a? Answer1: planet Answer2: star Answer3: moon Answer4: comet", "answer2")],
}


def _rows(task):
    return [{"instruction": question, "input": "", "output": f"the correct answer is {answer}", "answer": answer}
            for question, answer in SYNTHETIC[task]]


def _write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    else:
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("task, text, expected", [
    ("boolq", "the correct answer is true", "true"),
    ("boolq", "false, definitely not true", "false"),  # the first label word wins
    ("boolq", "The correct answer is True", ""),  # case-sensitive, as the official script
    ("piqa", "the correct answer is solution2", "solution2"),
    ("piqa", "solution3", ""),
    ("social_i_qa", "the correct answer is answer3", "answer3"),
    ("siqa", "answer5", "answer5"),  # the official pattern for SIQA is answer1-5
    ("hellaswag", "ending4 is best", "ending4"),
    ("hellaswag", "ending5", ""),
    ("winogrande", "option1", "option1"),
    ("ARC-Easy", "answer5", "answer5"),
    ("arc_c", "I pick answer1 or answer2", "answer1"),
    ("obqa", "the correct answer is answer4", "answer4"),
    ("openbookqa", "no idea", ""),
])
def test_extract_answer(task, text, expected):
    assert commonsense.extract_answer(task, text) == expected


def test_extract_answer_unknown_task():
    with pytest.raises(ValueError, match="unknown commonsense task 'mmlu'"):
        commonsense.extract_answer("mmlu", "answer1")


@pytest.mark.parametrize("name, expected", [
    ("boolq", "boolq"), ("BoolQ", "boolq"), ("siqa", "social_i_qa"), ("social-i-qa", "social_i_qa"),
    ("arc_e", "ARC-Easy"), ("ARC-Easy", "ARC-Easy"), ("arc-challenge", "ARC-Challenge"), ("obqa", "openbookqa"),
    ("HellaSwag", "hellaswag"), ("WinoGrande", "winogrande"), ("test", None), ("commonsense_170k", None),
])
def test_canonical_task(name, expected):
    assert commonsense.canonical_task(name) == expected


def test_task_from_file_name_and_folder_name(tmp_path):
    by_name = commonsense.load_examples(_write(tmp_path / "piqa.jsonl", _rows("piqa")))
    assert [row["task"] for row in by_name] == ["piqa", "piqa"]
    assert by_name[0] == {"task": "piqa", "instruction": SYNTHETIC["piqa"][0][0], "input": "",
                          "output": "the correct answer is solution1", "answer": "solution1"}
    by_folder = commonsense.load_examples(_write(tmp_path / "dataset" / "ARC-Challenge" / "test.json",
                                                 _rows("ARC-Challenge")))
    assert [row["task"] for row in by_folder] == ["ARC-Challenge"]


def test_task_argument_and_task_field(tmp_path):
    rows = [{**_rows("boolq")[0], "task": "boolq"}, {**_rows("winogrande")[0], "task": "WinoGrande"}]
    combined = commonsense.load_examples(_write(tmp_path / "combined.jsonl", rows))
    assert [row["task"] for row in combined] == ["boolq", "winogrande"]
    forced = commonsense.load_examples(_write(tmp_path / "data.jsonl", _rows("openbookqa")),
                                       task="obqa")
    assert {row["task"] for row in forced} == {"openbookqa"}


def test_training_file_without_task_and_default_output(tmp_path):
    rows = [{"instruction": "Is the sky blue?", "answer": "true"}, {"instruction": "Pick one.", "input": "ctx",
                                                                      "output": "the correct answer is answer2",
                                                                      "answer": "answer2"}]
    examples = commonsense.load_examples(_write(tmp_path / "commonsense_170k.json", rows))
    assert [row["task"] for row in examples] == [None, None]
    assert examples[0]["output"] == "the correct answer is true" and examples[0]["input"] == ""
    assert examples[1]["input"] == "ctx"
    with pytest.raises(ValueError, match="example 0 has no known task"):
        commonsense.evaluate(ScriptedModel(bpe_tokenizer(), {}), bpe_tokenizer(), examples, progress=False)


def test_folder_loads_every_task_in_official_order(tmp_path):
    for task in SYNTHETIC:
        _write(tmp_path / task / "test.json", _rows(task))
    examples = commonsense.load_examples(tmp_path, limit=1)
    assert [row["task"] for row in examples] == list(commonsense.LABEL_WORDS)
    assert len(commonsense.load_examples(tmp_path)) == sum(len(rows) for rows in SYNTHETIC.values())


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no commonsense task file in"):
        commonsense.load_examples(tmp_path)
    _write(tmp_path / "boolq.jsonl", _rows("boolq"))
    _write(tmp_path / "boolq" / "test.json", _rows("boolq"))
    with pytest.raises(ValueError, match="several files for task boolq"):
        commonsense.load_examples(tmp_path)
    with pytest.raises(ValueError, match="single file"):
        commonsense.load_examples(tmp_path, task="boolq")


@pytest.mark.parametrize("row, message", [
    ({"input": "", "answer": "true"}, ":2: missing field 'instruction'"),
    ({"instruction": "q", "input": ""}, ":2: missing field 'answer'"),
    ({"instruction": "q", "answer": "yes"}, r":2: field 'answer' is 'yes', not a label word of task boolq"),
    ({"instruction": "q", "answer": "true", "input": 3}, ":2: field 'input' must be a string"),
    ({"instruction": "q", "answer": "true", "task": "mmlu"}, ":2: unknown task 'mmlu'"),
])
def test_malformed_rows_name_file_line_and_field(tmp_path, row, message):
    path = _write(tmp_path / "boolq.jsonl", [_rows("boolq")[0], row])
    with pytest.raises(ValueError, match=f"boolq.jsonl{message}"):
        commonsense.load_examples(path)


def test_unknown_task_argument_and_missing_file(tmp_path):
    path = _write(tmp_path / "x.jsonl", _rows("boolq"))
    with pytest.raises(ValueError, match="unknown commonsense task 'mmlu'"):
        commonsense.load_examples(path, task="mmlu")
    with pytest.raises(FileNotFoundError, match="missing_boolq.json"):
        commonsense.load_examples(tmp_path / "missing_boolq.json")


def test_build_train_dataset_loss_on_output_only():
    tokenizer = bpe_tokenizer()
    example = {"task": "boolq", "instruction": "Is it?", "input": "context", "output": "the correct answer is true",
               "answer": "true"}
    row = commonsense.build_train_dataset([example], tokenizer, max_length=256)[0]
    prompt = commonsense.format_prompt(example)
    assert prompt.endswith("### Instruction:\nIs it?\n\n### Input:\ncontext\n\n### Response:")
    prompt_length = len(tokenizer(prompt)["input_ids"])
    assert row["labels"] == [IGNORE_INDEX] * prompt_length + row["input_ids"][prompt_length:]
    assert tokenizer.decode(row["input_ids"][prompt_length:]) == "the correct answer is true</s>"
    full = commonsense.build_train_dataset([example], tokenizer, max_length=256, train_on_prompt=True)[0]
    assert full["labels"] == full["input_ids"] == row["input_ids"]


def test_evaluate_per_task_and_average_accuracy():
    tokenizer = bpe_tokenizer()
    examples = [{**row, "task": task} for task in ("boolq", "piqa", "hellaswag") for row in _rows(task)]
    # boolq: 2/2 right; piqa: 1/2 (second says solution1 first); hellaswag: 0/1 (no label word)
    replies = {"boolq": ["the correct answer is true", "the correct answer is false"],
               "piqa": ["the correct answer is solution1", "solution1 or solution2"],
               "hellaswag": ["the correct answer is Ending3"]}
    script = {commonsense.format_prompt(example): reply
              for task in replies for example, reply in zip([e for e in examples if e["task"] == task], replies[task])}
    model = ScriptedModel(tokenizer, script)
    result = commonsense.evaluate(model, tokenizer, examples, batch_size=2, progress=False)
    assert result["metrics"] == pytest.approx({"accuracy/boolq": 1.0, "accuracy/piqa": 0.5,
                                               "accuracy/hellaswag": 0.0, "accuracy": 0.5})
    assert [p["extracted"] for p in result["predictions"]] == ["true", "false", "solution1", "solution1", ""]
    assert [p["correct"] for p in result["predictions"]] == [True, True, True, False, False]
    assert model.calls[0]["config"].max_new_tokens == 32  # the official budget is the default


def test_evaluate_tiny_random_llama_end_to_end(tmp_path):
    for task in SYNTHETIC:
        _write(tmp_path / f"{task}.jsonl", _rows(task))
    examples = commonsense.load_examples(tmp_path)
    tokenizer = bpe_tokenizer()
    result = commonsense.evaluate(tiny_llama(len(tokenizer)), tokenizer, examples, batch_size=4, max_new_tokens=4,
                                  progress=False)
    metrics = result["metrics"]
    assert set(metrics) == {f"accuracy/{task}" for task in SYNTHETIC} | {"accuracy"}
    assert metrics["accuracy"] == pytest.approx(sum(metrics[f"accuracy/{t}"] for t in SYNTHETIC) / len(SYNTHETIC))
    for prediction in result["predictions"]:
        assert prediction["extracted"] == commonsense.extract_answer(prediction["task"], prediction["generation"])
        assert prediction["correct"] == (prediction["extracted"] == prediction["target"])


def test_one_options_dict_serves_every_verb(tmp_path):
    tokenizer = bpe_tokenizer()
    options = {"task": "boolq", "train_on_prompt": True, "on_overlong": "drop"}
    examples = commonsense.load_examples(_write(tmp_path / "data.jsonl", _rows("boolq")), **options)
    assert {row["task"] for row in examples} == {"boolq"}
    row = commonsense.build_train_dataset(examples, tokenizer, max_length=256, **options)[0]
    assert row["labels"] == row["input_ids"]
    model = ScriptedModel(tokenizer, {commonsense.format_prompt(e): e["answer"] for e in examples})
    assert commonsense.evaluate(model, tokenizer, examples, progress=False, **options)["metrics"]["accuracy"] == 1.0
    with pytest.raises(ValueError, match=r"unknown commonsense task option\(s\) \['prompt_suffix'\]"):
        commonsense.evaluate(model, tokenizer, examples, progress=False, prompt_suffix="")
