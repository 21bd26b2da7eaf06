"""Shared generative pieces: file reading errors, prompt, response-only labels, batched greedy generation."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from tests.recipes.generative_fixtures import ScriptedModel, bpe_tokenizer, tiny_llama
from transformers import DataCollatorForSeq2Seq

from pica.recipes.tasks import generative
from pica.recipes.tasks.generative import IGNORE_INDEX


# ------------------------------------------------------------------------------------------- files

def test_read_records_jsonl_locations_and_blank_lines(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n', encoding="utf-8")
    records = generative.read_records(path)
    assert [record for _, record in records] == [{"a": 1}, {"a": 2}]
    assert [where for where, _ in records] == [f"{path}:1", f"{path}:3"]
    assert len(generative.read_records(path, limit=1)) == 1


def test_read_records_json_list(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([{"a": 1}, {"a": 2}, {"a": 3}]), encoding="utf-8")
    assert [where for where, _ in generative.read_records(path, limit=2)] == [f"{path}[0]", f"{path}[1]"]


@pytest.mark.parametrize("name, text, message", [
    ("bad.jsonl", '{"a": 1}\n{"a": \n', r"bad\.jsonl:2: invalid JSON"),
    ("list.jsonl", '{"a": 1}\n[1, 2]\n', r"list\.jsonl:2: each row must be a JSON object, got list"),
    ("dict.json", '{"a": 1}', r"dict\.json: a \.json data file must hold a list"),
    ("broken.json", '[{"a": 1},\n {"a": }]', r"broken\.json:2: invalid JSON"),
    ("scalar.json", '[{"a": 1}, 3]', r"scalar\.json\[1\]: each row must be a JSON object, got int"),
    ("rows.csv", "a\n1\n", r"rows\.csv: unsupported data file type '\.csv'; use one of \['\.jsonl', '\.json'\]"),
])
def test_read_records_errors_name_file_and_line(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        generative.read_records(path)


def test_read_records_is_the_classify_row_reader(tmp_path):
    """One row reader, one location format: the generative tasks and classify see the same rows."""
    from pica.recipes.data_files import iter_rows

    path = tmp_path / "ROWS.JSONL"
    path.write_text('{"a": 1}\n\n{"a": 2}\n', encoding="utf-8")
    assert generative.read_records(path) == list(iter_rows(path))
    assert [where for where, _ in generative.read_records(path)] == [f"{path}:1", f"{path}:3"]
    with pytest.raises(ValueError, match="limit must be >= 0"):
        generative.read_records(path, limit=-1)


def test_read_records_missing_file_names_path(tmp_path):
    missing = tmp_path / "nowhere" / "train.jsonl"
    with pytest.raises(FileNotFoundError, match="nowhere/train.jsonl"):
        generative.read_records(missing)


@pytest.mark.parametrize("record, message", [
    ({}, "missing field 'question'"),
    ({"question": None}, "missing field 'question'"),
    ({"question": 3}, "field 'question' must be a string, got int"),
    ({"question": "  "}, "field 'question' is empty"),
])
def test_require_text(record, message):
    with pytest.raises(ValueError, match=f"f.jsonl:4: {message}"):
        generative.require_text(record, "question", "f.jsonl:4")


def test_format_prompt_alpaca_with_and_without_input():
    assert generative.format_prompt("Add 2 and 3.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nAdd 2 and 3.\n\n### Response:")
    with_input = generative.format_prompt("Add.", "2 and 3")
    assert "paired with an input" in with_input
    assert with_input.endswith("### Instruction:\nAdd.\n\n### Input:\n2 and 3\n\n### Response:")


# -------------------------------------------------------------------------------------- tokenising

def test_labels_mask_exactly_the_prompt():
    tokenizer = bpe_tokenizer()
    prompts = ["### Instruction:\nHow many clips?\n\n### Response:", "Q: 2+2?"]
    responses = ["Natalia sold 72 clips. #### 72", "4"]
    dataset = generative.build_sft_dataset(prompts, responses, tokenizer, max_length=512)
    assert dataset.column_names == ["input_ids", "attention_mask", "labels"]
    for row, prompt, response in zip(dataset, prompts, responses):
        prompt_ids = tokenizer(prompt)["input_ids"]
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
        assert prompt_ids[0] == tokenizer.bos_token_id  # BOS is part of the prompt, hence masked
        assert row["input_ids"] == prompt_ids + response_ids + [tokenizer.eos_token_id]
        assert row["labels"] == [IGNORE_INDEX] * len(prompt_ids) + response_ids + [tokenizer.eos_token_id]
        assert row["attention_mask"] == [1] * len(row["input_ids"])
        # the response decodes back from the labelled positions alone
        labelled = [t for t in row["labels"] if t != IGNORE_INDEX]
        assert tokenizer.decode(labelled, skip_special_tokens=True) == response


def test_train_on_prompt_labels_everything():
    tokenizer = bpe_tokenizer()
    row = generative.build_sft_dataset(["Q: 2+2?"], ["4"], tokenizer, max_length=64, train_on_prompt=True)[0]
    assert row["labels"] == row["input_ids"]


def test_truncation_keeps_prompt_and_cuts_response_and_eos():
    tokenizer = bpe_tokenizer()
    prompt, response = "Q: how many eggs?", "Janet sells 16 - 3 - 4 = 9 duck eggs a day."
    prompt_ids = tokenizer(prompt)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    max_length = len(prompt_ids) + 3
    assert len(response_ids) > 3
    row = generative.build_sft_dataset([prompt], [response], tokenizer, max_length=max_length)[0]
    assert row["input_ids"] == prompt_ids + response_ids[:3]
    assert row["labels"] == [IGNORE_INDEX] * len(prompt_ids) + response_ids[:3]
    # exactly fitting: the EOS is the last kept token
    exact = len(prompt_ids) + len(response_ids) + 1
    row = generative.build_sft_dataset([prompt], [response], tokenizer, max_length=exact)[0]
    assert row["input_ids"][-1] == tokenizer.eos_token_id and len(row["input_ids"]) == exact


def test_overlong_prompt_dropped_with_warning_or_error(caplog):
    tokenizer = bpe_tokenizer()
    long_prompt, short_prompt = "word " * 40, "Q?"
    budget = len(tokenizer(short_prompt)["input_ids"]) + 4
    assert len(tokenizer(long_prompt)["input_ids"]) >= budget
    with caplog.at_level(logging.WARNING, logger="pica.recipes.tasks.generative"):
        dataset = generative.build_sft_dataset([long_prompt, short_prompt], ["a", "b"], tokenizer, max_length=budget)
    assert len(dataset) == 1
    assert dataset[0]["input_ids"][: len(tokenizer(short_prompt)["input_ids"])] == tokenizer(short_prompt)["input_ids"]
    assert "dropped 1 of 2 examples" in caplog.text
    with pytest.raises(ValueError, match="example 0: the prompt alone has"):
        generative.build_sft_dataset([long_prompt, short_prompt], ["a", "b"], tokenizer, max_length=budget,
                                     on_overlong="error")
    with pytest.raises(ValueError, match="no training example fits"):
        generative.build_sft_dataset([long_prompt], ["a"], tokenizer, max_length=budget)


def test_build_rejects_bad_arguments():
    tokenizer = bpe_tokenizer()
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        generative.build_sft_dataset(["a", "b"], ["c"], tokenizer, max_length=8)
    with pytest.raises(ValueError, match="on_overlong"):
        generative.build_sft_dataset(["a"], ["c"], tokenizer, max_length=8, on_overlong="truncate")
    tokenizer.eos_token = None
    with pytest.raises(ValueError, match="has no eos_token"):
        generative.build_sft_dataset(["a"], ["c"], tokenizer, max_length=8)


def test_rows_collate_with_seq2seq_collator():
    tokenizer = bpe_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    dataset = generative.build_sft_dataset(["Q: 2+2?", "Q: how many clips in May?"], ["4", "24"], tokenizer,
                                           max_length=64)
    batch = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX, padding=True)([*dataset])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    short = len(dataset[0]["input_ids"])
    assert batch["labels"][0, short:].eq(IGNORE_INDEX).all() and batch["attention_mask"][0, short:].eq(0).all()
    model = tiny_llama(len(tokenizer))
    loss = model(**batch).loss
    assert torch.isfinite(loss)


# -------------------------------------------------------------------------------------- generating

def test_generate_returns_only_new_text_in_input_order_and_restores_tokenizer():
    tokenizer = bpe_tokenizer()
    prompts = ["Q: 2+2?", "Q: how many clips altogether in April and May?", "Q: eggs?"]
    replies = {"Q: 2+2?": "The answer is: 4", prompts[1]: "#### 72", "Q: eggs?": "18"}
    model = ScriptedModel(tokenizer, replies)
    model.train()
    outputs = generative.generate_responses(model, tokenizer, prompts, batch_size=2, max_new_tokens=16,
                                            progress=False)
    assert outputs == [replies[p] for p in prompts]
    assert len(model.calls) == 2
    first = model.calls[0]
    assert first["padding_side"] == "left" and first["training"] is False
    assert first["input_ids"].shape[0] == 2
    # longest prompt first; left padding puts pad ids (EOS fallback) before the shorter prompt
    assert first["attention_mask"][1, 0] == 0 and first["attention_mask"][:, -1].eq(1).all()
    assert first["input_ids"][1, 0] == tokenizer.eos_token_id
    config = first["config"]
    assert config.do_sample is False and config.num_beams == 1 and config.max_new_tokens == 16
    assert config.pad_token_id == tokenizer.eos_token_id
    assert tokenizer.padding_side == "right" and tokenizer.pad_token is None
    assert model.training is True


def test_generate_restores_tokenizer_after_error():
    tokenizer = bpe_tokenizer()
    model = ScriptedModel(tokenizer, {})  # no scripted reply: generate raises KeyError
    with pytest.raises(KeyError):
        generative.generate_responses(model, tokenizer, ["Q?"], progress=False)
    assert tokenizer.padding_side == "right" and tokenizer.pad_token is None


def test_generate_real_tiny_llama_batched_matches_single():
    """Greedy decoding with left padding gives the same continuation batched as one at a time."""
    tokenizer = bpe_tokenizer()
    model = tiny_llama(len(tokenizer), seed=3)
    prompts = ["Q: 2+2?", "Natalia sold 48 clips in April.", "Q: eggs per day?"]
    batched = generative.generate_responses(model, tokenizer, prompts, batch_size=3, max_new_tokens=6,
                                            progress=False)
    single = [generative.generate_responses(model, tokenizer, [p], batch_size=1, max_new_tokens=6,
                                            progress=False)[0] for p in prompts]
    assert batched == single
    assert all(isinstance(text, str) for text in batched)
    encoded = tokenizer(prompts[0], return_tensors="pt")
    reference = model.generate(**encoded, do_sample=False, max_new_tokens=6, pad_token_id=tokenizer.eos_token_id)
    assert batched[0] == tokenizer.decode(reference[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True)


def test_generate_validates_arguments():
    tokenizer = bpe_tokenizer()
    model = ScriptedModel(tokenizer, {})
    assert generative.generate_responses(model, tokenizer, [], progress=False) == []
    with pytest.raises(ValueError, match="batch_size"):
        generative.generate_responses(model, tokenizer, ["a"], batch_size=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generative.generate_responses(model, tokenizer, ["a"], max_new_tokens=0)


@pytest.mark.parametrize("text, expected", [
    ("18 eggs.\n\n### Instruction:\nnext", "18 eggs.\n\n"),
    ("no stop here", "no stop here"),
    ("a Question: b Response: c", "a "),
])
def test_cut_at_stop(text, expected):
    assert generative.cut_at_stop(text, ("### Instruction", "Question:", "Response:")) == expected


def test_pica_peft_model_trains_on_response_rows_and_generates_through_the_adapter():
    """The rows give PiCa's M a gradient, and generation on the PeftModel uses the adapter (equals merged)."""
    from peft import get_peft_model

    from pica import PiCaConfig

    tokenizer = bpe_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    dataset = generative.build_sft_dataset(["Q: 2+2?", "Q: how many clips?"], ["4", "72 clips"], tokenizer,
                                           max_length=64)
    batch = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX, padding=True)([*dataset])
    tokenizer.pad_token = None
    model = get_peft_model(tiny_llama(len(tokenizer), seed=1), PiCaConfig(rank=4))
    model.train()
    model(**batch).loss.backward()
    updates = [p for name, p in model.named_parameters() if p.requires_grad]
    assert updates and all(p.grad is not None and p.grad.abs().sum() > 0 for p in updates)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for update in updates:
            update.copy_(torch.randn(update.shape, generator=generator) * 0.5)
    prompts = ["Q: 2+2?", "Natalia sold 48 clips in April."]
    adapted = generative.generate_responses(model, tokenizer, prompts, batch_size=2, max_new_tokens=6, progress=False)
    assert model.training is True  # restored
    base_only = generative.generate_responses(tiny_llama(len(tokenizer), seed=1), tokenizer, prompts, batch_size=2,
                                              max_new_tokens=6, progress=False)
    merged = generative.generate_responses(model.merge_and_unload(), tokenizer, prompts, batch_size=2,
                                           max_new_tokens=6, progress=False)
    assert adapted == merged
    assert adapted != base_only


def test_check_options():
    assert generative.check_options({"a": 2}, {"a": 1, "b": 0}, "demo") == {"a": 2, "b": 0}
    with pytest.raises(ValueError, match=r"unknown demo task option\(s\) \['c', 'd'\]; known: \['a', 'b'\]"):
        generative.check_options({"c": 1, "d": 2}, {"a": 1, "b": 0}, "demo")
