"""Results of runs: JSON files, mean ± sd over seeds, a printable table, PNG plots."""

from __future__ import annotations

import json
import math
import os
import secrets
import statistics
from pathlib import Path
from typing import Any, Iterable

__all__ = ["format_choices", "format_table", "plot_comparison", "plot_loss", "summarize", "write_json", "write_jsonl"]


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented JSON via a temporary file and an atomic rename.

    The temporary file has a unique name, so concurrent writers of one ``path`` (two processes sharing
    a results directory) never collide; the last rename wins and a reader sees one whole file.
    """
    path = Path(path)
    text = json.dumps(data, indent=2, default=str) + "\n"
    # A unique name per writer; created like any new file (mode 0666 minus the umask, as write_text does).
    temporary = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_jsonl(path: str | os.PathLike, rows: Iterable[Any]) -> None:
    """Write ``rows`` as JSON Lines (one compact object a line; values JSON cannot hold written as strings)."""
    Path(path).write_text("".join(f"{json.dumps(row, default=str)}\n" for row in rows), encoding="utf-8")


def _mean_sd(values: list[float]) -> dict[str, float]:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    if not finite:
        return {"mean": float("nan"), "sd": float("nan"), "n": 0}
    return {"mean": statistics.fmean(finite), "sd": statistics.stdev(finite) if len(finite) > 1 else 0.0,
            "n": len(finite)}


def summarize(runs: Iterable[dict]) -> dict[str, dict]:
    """Per method: mean/sd/n of every metric, of the times and of peak memory; parameter counts."""
    by_method: dict[str, list[dict]] = {}
    for run in runs:
        by_method.setdefault(run["method"], []).append(run)
    summary: dict[str, dict] = {}
    for method, group in by_method.items():
        metrics = sorted({name for run in group for name in run["metrics"]})
        summary[method] = {
            "seeds": [run["seed"] for run in group],
            "trainable_params": group[0]["trainable_params"],
            "lr": sorted({run["lr"] for run in group if run.get("lr") is not None}),
            "lr_source": sorted({run["lr_source"] for run in group if run.get("lr_source")}),
            "metrics": {name: _mean_sd([run["metrics"].get(name) for run in group]) for name in metrics},
            "train_seconds": _mean_sd([run["train_seconds"] for run in group]),
            "wall_seconds": _mean_sd([run["wall_seconds"] for run in group]),
            "peak_memory_mb": _mean_sd([run["peak_memory_mb"] for run in group]),
        }
    return summary


def _value(stats: dict[str, float], digits: int = 3) -> str:
    if stats["n"] == 0:
        return "n/a"
    if stats["n"] == 1:
        return f"{stats['mean']:.{digits}f}"
    return f"{stats['mean']:.{digits}f} ± {stats['sd']:.{digits}f}"


def _lr_cell(entry: dict) -> str:
    """``3e-03 (default)``; several values (``lr: auto`` chose per seed) joined by ``/``; ``-`` if none."""
    if not entry.get("lr"):
        return "-"
    sources = entry.get("lr_source") or []
    return "/".join(f"{value:.2g}" for value in entry["lr"]) + (f" ({', '.join(sources)})" if sources else "")


def format_table(summary: dict[str, dict], metric: str) -> str:
    """A plain-text table: method, trainable params (adapter + head), learning rate used (and where it
    came from: recipe, default, auto), metric, train time, peak memory."""
    header = ("method", "trainable params (adapter + head)", "lr", metric, "train s", "peak MiB")
    rows = []
    for method, entry in summary.items():
        params = entry["trainable_params"]
        rows.append((method, f"{params['total']:,} ({params['adapter']:,} + {params['head']:,})", _lr_cell(entry),
                     _value(entry["metrics"].get(metric, {"n": 0})), _value(entry["train_seconds"], 1),
                     f"{entry['peak_memory_mb']['mean']:.0f}"))
    widths = [max(len(str(row[i])) for row in (header, *rows)) for i in range(len(header))]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)) for row in (header, *rows)]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def format_choices(runs: Iterable[dict]) -> str:
    """One line per run that chose on validation: the ``lr: auto`` grid with each validation score
    (the chosen one starred), and the epoch early stopping kept; empty if no run chose anything."""
    lines = []
    for run in runs:
        parts = []
        if run.get("lr_search"):
            search = run["lr_search"]
            grid = ", ".join(f"{lr}{'*' if float(lr) == search['chosen'] else ''} → {score:.4f}"
                             for lr, score in search["validation"].items())
            parts.append(f"lr auto on {search['validation_examples']} validation examples "
                         f"({search['metric']}): {grid}")
        if run.get("early_stopping"):
            stop = run["early_stopping"]
            parts.append(f"early stopping (patience {stop['patience']}): best epoch {stop['best_epoch']} "
                         f"({stop['metric']} {stop['best_metric']:.4f}) of {stop['epochs_trained']:g} trained")
        if parts:
            lines.append(f"{run['method']} seed {run['seed']}: " + "; ".join(parts))
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss(log_history: list[dict], path: str | os.PathLike, title: str) -> bool:
    """Training loss vs step from a Trainer ``log_history``; False (nothing written) if no loss was logged."""
    points = [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry and "step" in entry]
    if not points:
        return False
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(5, 3.5))
    axis.plot([p[0] for p in points], [p[1] for p in points], marker=".")
    axis.set(xlabel="optimiser step", ylabel="training loss", title=title)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def plot_comparison(summary: dict[str, dict], metric: str, path: str | os.PathLike, title: str) -> None:
    """Metric (mean ± sd over seeds) vs trainable parameters (log scale), one point per method."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(5.5, 4))
    for method, entry in summary.items():
        stats = entry["metrics"].get(metric)
        if not stats or stats["n"] == 0:
            continue
        params = max(entry["trainable_params"]["total"], 1)
        axis.errorbar(params, stats["mean"], yerr=stats["sd"], fmt="o", capsize=3)
        axis.annotate(method, (params, stats["mean"]), textcoords="offset points", xytext=(5, 5))
    axis.set_xscale("log")
    axis.set(xlabel="trainable parameters (adapter + head)", ylabel=metric, title=title)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
