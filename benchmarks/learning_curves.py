"""Validation accuracy after every epoch, per method, in the demo's setting: to choose default epochs.

all-MiniLM-L6-v2 trained on the first ``--train-size`` training rows of a shipped classify dataset
(``tweets``: the demo's training tweets, the rows `pica demo` trains on; ``bbc_headlines``: the
training headlines of ``benchmarks/quality.py``), at each method's default learning rate
(pica.recipes.defaults), rank 16, batch 16, 64 tokens, linear schedule with 6 % warm-up over
``--epochs``; after each epoch, accuracy on ``--validation-size`` further rows of the corpus that are
neither in that training nor in the test split (the test rows are never used). One ``Trainer`` run per
method (:func:`pica.recipes.fit.fit`, the harness's own training with ``eval_strategy="epoch"``).
Prints and writes one JSON object.

    nice -n 19 python benchmarks/learning_curves.py --out benchmarks/results/learning_curves_tweets.json
    nice -n 19 python benchmarks/learning_curves.py --dataset bbc_headlines --train-size 640 \
        --out benchmarks/results/learning_curves_bbc_headlines.json

Caveat: with a linear schedule the accuracy at epoch k of an E-epoch run is not that of a k-epoch
run (its learning rate has not decayed to 0 yet); the curve shows where training stops paying off.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info  # noqa: E402

from pica.recipes.config import RecipeConfig  # noqa: E402
from pica.recipes.demo import DEMO_RECIPE, demo_examples, demo_model_dir  # noqa: E402
from pica.recipes.features import fit_features  # noqa: E402
from pica.recipes.fit import fit  # noqa: E402
from pica.recipes.harness import prepare  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--dataset", choices=["tweets", "bbc_headlines"], default="tweets")
    parser.add_argument("--methods", nargs="+", default=["features", "probe", "pica", "lora", "full"],
                        help="features: one validation accuracy (no epochs), the frozen-feature reference")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--train-size", type=int, default=DEMO_RECIPE["train_limit"])
    parser.add_argument("--validation-size", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    torch.set_num_threads(1)
    info, started = machine_info(), time.perf_counter()
    if args.dataset == "tweets":
        load, labels = demo_examples, DEMO_RECIPE["task_options"]["labels"]
        test_size, train_rows = DEMO_RECIPE["eval_limit"], DEMO_RECIPE["train_limit"]
    else:  # benchmarks/quality.py's split: the same shuffle, so its training rows come first here
        from quality import BBC_LABELS, SIZES, bbc_headlines

        load, labels = bbc_headlines, BBC_LABELS
        train_rows, test_size = SIZES["bbc_headlines"]
    rows, _ = load(train_rows + args.validation_size, test_size)  # the test split is drawn first: unseen
    train, validation = rows[:min(args.train_size, train_rows)], rows[train_rows:]
    curves: dict[str, dict] = {}

    def write(complete: bool) -> dict:
        result = {"benchmark": "learning_curves", "complete": complete,
                  "dataset": f"{args.dataset}: the first --train-size of its training rows",
                  "settings": {**dataclasses.asdict(recipe), "output_dir": None, "seed": args.seed,
                               "train_examples": len(train), "validation_examples": len(validation),
                               "validation": f"further {args.dataset} rows, disjoint from its train and test splits"},
                  "curves": curves, "total_wall_seconds": round(time.perf_counter() - started, 1), "machine": info}
        Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
        return result

    with tempfile.TemporaryDirectory(prefix="pica-curves-") as scratch:
        keys = ("task", "task_options", "rank", "batch_size", "eval_batch_size", "max_length", "warmup",
                "group_by_length", "logging_steps")
        task_options = {**DEMO_RECIPE["task_options"], "labels": labels}
        recipe = RecipeConfig(**{key: DEMO_RECIPE[key] for key in keys if key != "task_options"},
                              task_options=task_options, model=str(demo_model_dir()),
                              methods=list(args.methods), epochs=float(args.epochs), save_model=False,
                              output_dir=str(Path(scratch) / "out"))
        prepared = prepare(recipe, train_examples=train, eval_examples=validation)
        for method in args.methods:
            if method == "features":  # no epochs: one logistic regression on frozen features, a reference level
                fitted = fit_features(prepared, prepared.methods[method].recipe, args.seed)
                curves[method] = {"trainable_params": fitted.trainable_params,
                                  "validation_accuracy": fitted.metrics["accuracy"],
                                  "validation_f1": fitted.metrics["f1"]}
                write(complete=False)
                continue
            one = prepared.methods[method].recipe
            with contextlib.redirect_stdout(sys.stderr):
                fitted = fit(prepared, method, one, args.seed, train, validation, Path(scratch) / method, False)
            history = fitted.trainer.state.log_history
            curves[method] = {
                "lr": one.lr, "trainable_params": fitted.params, "train_seconds": round(fitted.train_seconds, 1),
                "epoch": [entry["epoch"] for entry in history if "eval_accuracy" in entry],
                "validation_accuracy": [entry["eval_accuracy"] for entry in history if "eval_accuracy" in entry],
                "validation_f1": [entry["eval_f1"] for entry in history if "eval_f1" in entry],
                "validation_loss": [entry["eval_loss"] for entry in history if "eval_loss" in entry],
            }
            print(f"[{time.perf_counter() - started:6.0f} s] {method} lr {one.lr:g}: "
                  + " ".join(f"{a:.3f}" for a in curves[method]["validation_accuracy"]), file=sys.stderr, flush=True)
            write(complete=False)  # a partial result survives an interrupted run
    result = write(complete=True)
    print(json.dumps({k: v for k, v in result.items() if k != "settings"}, default=str))


if __name__ == "__main__":
    main()
