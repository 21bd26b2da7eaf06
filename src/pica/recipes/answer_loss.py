"""Answer-token evaluation loss of a generative task: the causal-LM loss of the reference responses,
prompt tokens masked, computed by transformers ``Trainer.evaluate`` on the task's own tokenisation.

This is the smooth companion of exact-match accuracy: a small model (e.g. 135M parameters on GSM8K)
gets almost every final answer wrong before and after a short fine-tune, while the loss on the
reference solutions still moves. It uses exactly the rows that training would use
(``task.build_train_dataset``: same prompt template, same ``max_length`` truncation, ``-100`` on prompt
and padding positions), so it is comparable across methods and with the untrained base.

Definition (what ``Trainer.evaluate`` computes): the eval rows are taken in file order in batches of
``batch_size``; each batch's loss is the mean token cross-entropy over its response tokens (the model's
own loss); ``eval_loss`` is the mean of the batch losses weighted by batch size. With the same rows and
batch size every model is scored on the same batches.
"""

from __future__ import annotations

import logging
import tempfile
from types import ModuleType
from typing import Any

import torch
from transformers import DataCollatorForSeq2Seq, PrinterCallback, Trainer, TrainingArguments

from .batching import eval_mode

logger = logging.getLogger(__name__)

__all__ = ["answer_token_loss"]


def answer_token_loss(model, tokenizer, task: ModuleType, examples: list[dict[str, Any]], *, max_length: int,
                      batch_size: int, options: dict[str, Any]) -> dict[str, float]:
    """Loss of ``model`` on the reference responses of ``examples`` (see the module docstring).

    Args:
        model: a HF causal LM (plain or a ``PeftModel``).
        tokenizer: its tokenizer.
        task: a generative task module (``build_train_dataset``).
        examples: the task's canonical rows.
        max_length: truncation length, as in training.
        batch_size: evaluation batch size.
        options: task options (passed to ``build_train_dataset``; training-only options such as
            ``train_on_prompt`` are overridden: the loss is always on the response tokens only).

    Returns:
        ``{"eval_loss": float, "eval_loss_tokens": int, "eval_loss_examples": int}``.

    Raises:
        ValueError: ``examples`` is empty, or no row fits ``max_length``.
    """
    if not examples:
        raise ValueError("no examples for the answer-token loss")
    options = {**options}
    if _accepts(task, "train_on_prompt"):
        options["train_on_prompt"] = False
    dataset = task.build_train_dataset(examples, tokenizer, max_length=max_length, **options)
    tokens = sum(sum(label != -100 for label in row) for row in dataset["labels"])
    collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, padding=True)
    with tempfile.TemporaryDirectory(prefix="pica-eval-loss-") as scratch:
        args = TrainingArguments(output_dir=scratch, per_device_eval_batch_size=batch_size, report_to=[],
                                 use_cpu=not torch.cuda.is_available(), remove_unused_columns=False,
                                 label_names=["labels"], disable_tqdm=True, save_strategy="no")
        with eval_mode(model):
            trainer = Trainer(model=model, args=args, data_collator=collator)
            trainer.remove_callback(PrinterCallback)  # library code: the metrics are returned, not printed
            metrics = trainer.evaluate(eval_dataset=dataset)
    return {"eval_loss": float(metrics["eval_loss"]), "eval_loss_tokens": int(tokens),
            "eval_loss_examples": len(dataset)}


def _accepts(task: ModuleType, option: str) -> bool:
    return option in getattr(task, "OPTIONS", {})
