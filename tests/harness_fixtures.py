"""Tiny saved models + tokenizer and toy data files for the harness / CLI tests (no hub access)."""

from __future__ import annotations

import json
import types
from pathlib import Path

import torch
from transformers import BertConfig, BertModel, BertTokenizerFast, LlamaConfig, LlamaForCausalLM

WORDS = ["good", "great", "fun", "nice", "bad", "awful", "boring", "sad", "the", "movie", "film", "was", "is",
         "very", "a", "plot", "q", "answer", "yes", "no"]
POSITIVE, NEGATIVE = WORDS[:4], WORDS[4:8]


def save_tokenizer(directory: Path) -> BertTokenizerFast:
    directory.mkdir(parents=True, exist_ok=True)
    vocab = {token: index for index, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    tokenizer = BertTokenizerFast(vocab=vocab, do_lower_case=True)
    tokenizer.save_pretrained(directory)
    return tokenizer


def save_tiny_bert(directory: Path, seed: int = 0, hidden_size: int = 32) -> Path:
    """A random 2-layer BERT encoder + WordPiece tokenizer, loadable by AutoModelForSequenceClassification
    (``hidden_size=64``: sizes bitsandbytes can pack for its CPU kernel, see tests/quantized_fixtures.py)."""
    tokenizer = save_tokenizer(directory)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=2 * hidden_size, max_position_embeddings=64)
    BertModel(config).save_pretrained(directory)
    return directory


def save_tiny_llama(directory: Path, seed: int = 0) -> Path:
    """A random 2-layer Llama + the same tokenizer ([SEP] as EOS, [PAD] as pad)."""
    tokenizer = save_tokenizer(directory)
    tokenizer.eos_token = "[SEP]"
    tokenizer.save_pretrained(directory)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.sep_token_id,
                         bos_token_id=tokenizer.cls_token_id)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def sentiment_rows(count: int, seed: int = 0) -> list[dict]:
    """Toy 2-class sentiment rows: the label is whether the sentence has a positive word."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for index in range(count):
        label = index % 2
        words = POSITIVE if label else NEGATIVE
        word = words[int(torch.randint(len(words), (1,), generator=generator))]
        rows.append({"sentence": f"the movie was very {word}", "label": label})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def fake_generative_task() -> types.ModuleType:
    """A minimal generative task following the task interface (prompt → answer word, exact match)."""
    from datasets import Dataset

    module = types.ModuleType("fake_generative")
    module.TASK_KIND = "generative"

    def load_examples(source, *, limit=None, **options):
        rows = [json.loads(line) for line in Path(source).read_text().splitlines() if line.strip()]
        for number, row in enumerate(rows, start=1):
            if "question" not in row or "answer" not in row:
                raise ValueError(f"{source}:{number}: missing field 'question' or 'answer'")
        return rows[:limit] if limit is not None else rows

    def build_train_dataset(examples, tokenizer, *, max_length, **options):
        columns = {"input_ids": [], "attention_mask": [], "labels": []}
        for example in examples:
            prompt = tokenizer(example["question"], add_special_tokens=False)["input_ids"]
            answer = tokenizer(example["answer"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            ids = (prompt + answer)[:max_length]
            columns["input_ids"].append(ids)
            columns["attention_mask"].append([1] * len(ids))
            columns["labels"].append(([-100] * len(prompt) + answer)[:max_length])
        return Dataset.from_dict(columns)

    def evaluate(model, tokenizer, examples, *, batch_size=8, max_new_tokens=4, progress=True, **options):
        model.eval()
        side, tokenizer.padding_side = tokenizer.padding_side, "left"
        predictions = []
        try:
            for start in range(0, len(examples), batch_size):
                batch = examples[start:start + batch_size]
                inputs = tokenizer([e["question"] for e in batch], add_special_tokens=False, return_tensors="pt",
                                   return_token_type_ids=False, padding=True).to(next(model.parameters()).device)
                with torch.no_grad():
                    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                            pad_token_id=tokenizer.pad_token_id)
                for example, row in zip(batch, output[:, inputs["input_ids"].shape[1]:]):
                    text = tokenizer.decode(row, skip_special_tokens=True).strip()
                    predictions.append({"prompt": example["question"], "target": example["answer"],
                                        "prediction": text, "correct": text.split()[:1] == [example["answer"]]})
        finally:
            tokenizer.padding_side = side
        accuracy = sum(p["correct"] for p in predictions) / len(predictions)
        return {"metrics": {"accuracy": accuracy}, "predictions": predictions}

    module.load_examples, module.build_train_dataset, module.evaluate = load_examples, build_train_dataset, evaluate
    return module
