"""PNG plots of a spectral report (matplotlib, Agg backend). The only analysis module importing matplotlib."""

from __future__ import annotations

import math
from pathlib import Path

from ..naming import parse_module_path

__all__ = ["NO_CHANGE", "plot_report"]

NO_CHANGE = "no layer changed (ΔW = 0)"
"""Text drawn in place of a plot when the update is zero everywhere (e.g. an untrained adapter)."""


def plot_report(report: dict, out_dir: str | Path, title: str = "") -> list[Path]:
    """Write ``energy_fraction.png`` (per layer, per role, vs the random-subspace level),
    ``intruders.png`` (role × layer heatmap at the headline ε) and ``intruders_sweep.png``.

    Args:
        report: output of :func:`pica.analysis.analyze_weight_pairs`.
        out_dir: directory for the PNG files (created).
        title: prefix of the figure titles.

    If no layer changed (``ΔW = 0`` everywhere, e.g. PiCa with ``M = 0``), the same files are
    written with :data:`NO_CHANGE` in place of the bars and the heatmap.

    Returns:
        Paths of the written files.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    roles = sorted(report["roles"])
    by_role: dict[str, dict[int, dict]] = {role: {} for role in roles}
    for name, layer in report["layers"].items():
        if layer["delta_norm"] > 0:  # unchanged layers are left blank
            path = parse_module_path(name)
            by_role[path.role][path.layer if path.layer is not None else 0] = layer
    roles = [role for role in roles if by_role[role]]
    depth = 1 + max((i for layers in by_role.values() for i in layers), default=0)
    short = [role.replace(".*.", "·").split("·")[-1] for role in roles]
    written = []

    fig, ax = plt.subplots(figsize=(max(6, 1.2 * depth * len(roles) / 4), 4))
    width = 0.8 / max(len(roles), 1)
    for j, role in enumerate(roles):
        xs = [i + j * width for i in sorted(by_role[role])]
        ys = [by_role[role][i]["energy_fraction"] for i in sorted(by_role[role])]
        ax.bar(xs, [0 if math.isnan(y) else y for y in ys], width, label=short[j])
    baseline = report["summary"]["random_energy_fraction"]
    if not math.isnan(baseline):
        ax.axhline(baseline, color="k", linestyle="--", linewidth=1, label=f"random subspace ({baseline:.2f})")
    ax.set(xlabel="layer", ylabel="‖ΔW PᵀP‖² / ‖ΔW‖²", ylim=(0, 1.05), xticks=[i + 0.4 - width / 2 for i in range(depth)],
           xticklabels=range(depth), title=f"{title} energy of ΔW in W0's top-{report['settings']['rank']} subspace".strip())
    if roles:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.text(0.5, 0.5, NO_CHANGE, ha="center", va="center", transform=ax.transAxes)
    written.append(_save(fig, out_dir / "energy_fraction.png"))

    epsilon = f"{report['settings']['epsilon']:g}"
    grid = [[by_role[role].get(i, {}).get("intruders", {}).get(epsilon, math.nan) for i in range(depth)] for role in roles]
    fig, ax = plt.subplots(figsize=(max(5, 0.5 * depth + 3), 0.45 * len(roles) + 1.5))
    ax.set(title=f"{title} intruder dimensions (top-{report['settings']['top_k']}, ε={epsilon})".strip())
    if roles:
        image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=report["settings"]["top_k"])
        ax.set(yticks=range(len(roles)), yticklabels=short, xlabel="layer")
        fig.colorbar(image, ax=ax)
    else:  # nothing to draw: say so instead of an empty heatmap
        ax.text(0.5, 0.5, NO_CHANGE, ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    written.append(_save(fig, out_dir / "intruders.png"))

    sweep = report["summary"]["intruders_sweep"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([float(e) for e in sweep], list(sweep.values()), marker="o")
    ax.set(xlabel="ε", ylabel="intruder dimensions (all layers)", title=f"{title} ε sweep".strip())
    written.append(_save(fig, out_dir / "intruders_sweep.png"))
    return written


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
