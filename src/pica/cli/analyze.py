"""``pica analyze``: spectral report of a fine-tuning update (printing and file output live here; the
measures are :mod:`pica.analysis`).

Inputs, resolved in this order:

* a ``pica train`` output directory (``config.yaml`` + ``<method>/seed<k>/run.json``): every saved run;
* a run directory ``<out>/<method>/seed<k>`` (its ``run.json`` names the base model and task);
* a PEFT adapter directory of any method (``adapter_config.json``), merged into a copy of its base;
* a fine-tuned model directory (``config.json``), compared with ``--base`` (both loaded with ``AutoModel``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

logger = logging.getLogger(__name__)

__all__ = ["AnalysisInput", "find_inputs", "load_pairs", "run_analyze"]

DEFAULT_RANK = 16
"""Subspace rank when none is given and the adapter is not PiCa."""


@dataclass
class AnalysisInput:
    """One fine-tuned model or adapter to compare with its base."""

    name: str  # "" for a single input, "<method>/seed<k>" inside a train output directory
    directory: Path  # the adapter or model directory
    kind: str  # "adapter" | "model"
    base: str  # base model path (or hub id)
    info: dict[str, Any] = field(default_factory=dict)  # the run's run.json, if any


def _base_for(directory: Path, kind: str, info: dict[str, Any], base: Optional[str]) -> str:
    if base is not None:
        return base
    if info.get("model"):
        return str(info["model"])
    if kind == "adapter":
        from ..recipes.saved import adapter_config

        recorded = adapter_config(directory)
        if recorded.get("base_model_name_or_path"):
            return str(recorded["base_model_name_or_path"])
    raise ValueError(f"no base model known for {directory}: pass --base")


def find_inputs(path: str | Path, base: Optional[str] = None) -> list[AnalysisInput]:
    """Resolve the ``tuned`` argument of ``pica analyze`` into one or more inputs.

    Raises:
        FileNotFoundError: ``path`` (or ``--base``) does not exist or holds no adapter/model/run.
        ValueError: the base model is unknown (no ``--base``, ``run.json`` or adapter record).
    """
    from ..recipes.run_records import read_run_info
    from ..recipes.saved import find_saved

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"pica analyze: directory not found: {path}")
    if base is not None and not Path(base).is_dir():
        raise FileNotFoundError(f"pica analyze: --base directory not found: {base}")
    if (path / "config.yaml").is_file() and not (path / "config.json").is_file():  # a `pica train` output
        runs = sorted(p.parent for p in path.glob("*/seed*/run.json"))
        inputs = []
        for run in runs:
            info = read_run_info(run / "run.json")
            if not info.get("saved"):
                continue  # trained with save_model: false
            directory, kind, info = find_saved(run)
            inputs.append(AnalysisInput(f"{run.parent.name}/{run.name}", directory, kind,
                                        _base_for(directory, kind, info, base), info))
        if not inputs:
            raise FileNotFoundError(f"pica analyze: {path} is a `pica train` output without saved adapters or "
                                    "models (runs with save_model: false cannot be analysed)")
        return inputs
    directory, kind, info = find_saved(path)
    return [AnalysisInput("", directory, kind, _base_for(directory, kind, info, base), info)]


def default_rank(item: AnalysisInput) -> int:
    """The adapter's own rank for PiCa, else :data:`DEFAULT_RANK`."""
    if item.kind == "adapter":
        from ..recipes.saved import adapter_config

        recorded = adapter_config(item.directory)
        if str(recorded.get("peft_type", "")).upper() == "PICA" and isinstance(recorded.get("rank"), int):
            return recorded["rank"]
    return DEFAULT_RANK


def _num_labels(item: AnalysisInput) -> Optional[int]:
    """Classifier size of a sequence-classification adapter: from ``run.json``, else the saved head weight."""
    recorded = item.info.get("task_options", {}).get("num_labels")
    if recorded:
        return int(recorded)
    from ..recipes.saved import saved_head_size

    return saved_head_size(item.directory)


def load_pairs(item: AnalysisInput):
    """``{module path: (W0, W)}`` for ``item`` (an adapter is merged into the base after W0 is copied)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModel

    from ..analysis import linear_weights, weight_pairs
    from ..recipes.methods import adapter_task_kind
    from ..recipes.models import load_base_model, model_source
    from ..recipes.saved import adapter_config

    gguf_file = item.info.get("gguf_file")
    if item.kind == "model":
        source, extra = model_source(item.base, gguf_file)
        base = AutoModel.from_pretrained(source, dtype=torch.float32, **extra)
        tuned = AutoModel.from_pretrained(str(item.directory), dtype=torch.float32)
        return weight_pairs(base, tuned)
    recorded = adapter_config(item.directory)
    modality = "text"
    if item.info.get("task"):
        from ..recipes.tasks import get_task, task_modality

        task = get_task(item.info["task"])
        task_kind, modality = task.TASK_KIND, task_modality(task)
    else:
        task_kind = adapter_task_kind(recorded.get("task_type"))
    if task_kind is None:
        source, extra = model_source(item.base, gguf_file)
        model = AutoModel.from_pretrained(source, dtype=torch.float32, **extra)
    else:
        options = item.info.get("task_options", {})
        model = load_base_model(item.base, task_kind, gguf_file=gguf_file, num_labels=_num_labels(item),
                                problem=options.get("problem"), modality=modality)
    base_weights = {name: weight.clone() for name, weight in linear_weights(model).items()}  # (out, in) each
    merged = PeftModel.from_pretrained(model, str(item.directory)).merge_and_unload()
    tuned_weights = linear_weights(merged)
    pairs = {name: (weight, tuned_weights[name]) for name, weight in base_weights.items()
             if name in tuned_weights and tuned_weights[name].shape == weight.shape}
    if not pairs:  # pragma: no cover - same model class on both sides
        raise ValueError(f"{item.directory}: no linear module in common with the base {item.base}")
    return pairs


def _json_ready(value: Any) -> Any:
    """NaN → null so report.json is strict JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _json_ready(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_ready(item) for item in value]
    return value


def _format(report: dict, label: str) -> str:
    settings = report["settings"]
    eps = f"{settings['epsilon']:g}"
    header = ("role", "changed", "energy in top-r", "random r/in", "max angle °", f"intruders (ε={eps})")
    rows = []
    for role, entry in [*sorted(report["roles"].items()), ("all", report["summary"])]:
        rows.append((role, f"{entry['changed_layers']}/{entry['layers']}", f"{entry['energy_fraction']:.3f}",
                     f"{entry['random_energy_fraction']:.3f}", f"{entry['max_principal_angle_deg']:.1f}",
                     str(entry["intruders"])))
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    lines = [f"{label}: rank {settings['rank']}, top-k {settings['top_k']}"]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in (header, *rows)]
    sweep = ", ".join(f"{e}: {n}" for e, n in report["summary"]["intruders_sweep"].items())
    return "\n".join(lines + [f"intruders by ε (all layers): {sweep}"])


def _check_args(args: argparse.Namespace) -> None:
    if args.rank is not None and args.rank < 1:
        raise ValueError(f"--rank must be ≥ 1, got {args.rank}")
    if args.top_k < 1:
        raise ValueError(f"--top-k must be ≥ 1, got {args.top_k}")
    for name, values in (("--epsilon", [args.epsilon]), ("--epsilons", args.epsilons or [])):
        bad = [v for v in values if not 0 < v <= 1]
        if bad:
            raise ValueError(f"{name} must be in (0, 1], got {bad}")


def run_analyze(args: argparse.Namespace) -> int:
    """``pica analyze``: report.json + PNG plots per input under ``--out`` (written atomically)."""
    from ..analysis import analyze_weight_pairs
    from ..analysis.plots import plot_report
    from ..analysis.report import DEFAULT_EPSILONS
    from ..io import atomic_directory, check_output_directory

    _check_args(args)
    inputs = find_inputs(args.tuned, args.base)
    read = {"tuned": args.tuned, "--base": args.base}
    for item in inputs:
        of = f" of {item.name}" if item.name else ""
        read.update({f"adapter/model{of}": item.directory, f"base model{of}": item.base})
    check_output_directory(args.out, args.overwrite, "--out", read)
    reports = []
    for item in inputs:  # everything is computed before anything is written
        rank = args.rank if args.rank is not None else default_rank(item)
        report = analyze_weight_pairs(load_pairs(item), rank=rank, top_k=args.top_k, epsilon=args.epsilon,
                                      epsilons=args.epsilons or DEFAULT_EPSILONS)
        report["inputs"] = {"tuned": str(item.directory), "kind": item.kind, "base": item.base,
                            "method": item.info.get("method"), "seed": item.info.get("seed")}
        reports.append((item, report))
        if not report["summary"]["changed_layers"]:
            logger.warning("%s: no layer changed (ΔW = 0 everywhere, e.g. an untrained PiCa adapter with M = 0): the "
                           "report lists every layer as unchanged and the plots are empty", item.directory)
    with atomic_directory(args.out, args.overwrite, "--out", read) as staging:
        summary = {}
        for item, report in reports:
            target = staging / item.name if item.name else staging
            target.mkdir(parents=True, exist_ok=True)
            (target / "report.json").write_text(json.dumps(_json_ready(report), indent=2) + "\n", encoding="utf-8")
            plot_report(report, target, title=item.name or item.directory.name)
            summary[item.name or "."] = _json_ready({**report["summary"], "rank": report["settings"]["rank"],
                                                     "inputs": report["inputs"]})
        if len(reports) > 1:
            (staging / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    for item, report in reports:
        print(_format(report, item.name or str(item.directory)))
        print()
    print(f"reports and plots in {args.out}/")
    return 0
