"""Per-layer and per-role spectral report of a fine-tuning update (JSON-ready dicts)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from ..naming import parse_module_path
from .spectral import energy_fraction, intruder_cosines, principal_angles, top_right_subspace
from .weights import weight_pairs

__all__ = ["DEFAULT_EPSILONS", "analyze_models", "analyze_weight_pairs"]

DEFAULT_EPSILONS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def _layer_report(
    base: torch.Tensor, tuned: torch.Tensor, rank: int, top_k: int, epsilons: Sequence[float]
) -> dict:
    rank = min(rank, *base.shape)
    delta = tuned.double() - base.double()  # (out, in)
    base_subspace = top_right_subspace(base, rank)  # (rank, in)
    angles = principal_angles(top_right_subspace(tuned, rank), base_subspace)
    cosines = intruder_cosines(base, tuned, top_k)
    norm = delta.norm().item()
    return {
        "shape": list(base.shape),
        "rank": rank,
        "delta_norm": norm,
        "relative_delta_norm": norm / max(base.double().norm().item(), 1e-300),
        "energy_fraction": energy_fraction(delta, base_subspace),
        "random_energy_fraction": rank / base.shape[1],
        "max_principal_angle_deg": angles.max().item(),
        "mean_principal_angle_deg": angles.mean().item(),
        "intruder_max_cosines": cosines.tolist(),
        "intruders": {f"{eps:g}": int((cosines < eps).sum()) for eps in epsilons},
    }


def _mean(values: Iterable[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def analyze_weight_pairs(
    pairs: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    rank: int,
    top_k: int = 10,
    epsilon: float = 0.5,
    epsilons: Sequence[float] = DEFAULT_EPSILONS,
) -> dict:
    """Spectral report for ``(W0, W)`` pairs.

    Args:
        pairs: module path → ``(W0, W)``, each ``(out, in)``.
        rank: size of W0's top right singular subspace (clipped to ``min(out, in)`` per layer).
        top_k: leading singular vectors of ``W`` tested for intruder dimensions.
        epsilon: the headline intruder threshold.
        epsilons: thresholds of the sweep (``epsilon`` is added if missing).

    Returns:
        ``{"settings", "layers": {path: {...}}, "roles": {role: {...}}, "summary": {...}}`` where a
        role is the path with layer indices replaced by ``*``. Unchanged layers (``ΔW = 0``) are
        listed with ``energy_fraction = nan`` and left out of the averages.
    """
    epsilons = sorted(set(epsilons) | {epsilon})
    layers = {name: _layer_report(w0, w, rank, top_k, epsilons) for name, (w0, w) in pairs.items()}
    roles: dict[str, list[str]] = {}
    for name in layers:
        roles.setdefault(parse_module_path(name).role, []).append(name)
    key = f"{epsilon:g}"

    def aggregate(names: list[str]) -> dict:
        changed = [layers[n] for n in names if layers[n]["delta_norm"] > 0]
        return {
            "layers": len(names),
            "changed_layers": len(changed),
            "energy_fraction": _mean(r["energy_fraction"] for r in changed),
            "random_energy_fraction": _mean(r["random_energy_fraction"] for r in changed),
            "max_principal_angle_deg": max((r["max_principal_angle_deg"] for r in changed), default=math.nan),
            "intruders": sum(r["intruders"][key] for r in changed),
            "intruders_sweep": {f"{e:g}": sum(r["intruders"][f"{e:g}"] for r in changed) for e in epsilons},
        }

    return {
        "settings": {"rank": rank, "top_k": top_k, "epsilon": epsilon, "epsilons": list(epsilons)},
        "layers": layers,
        "roles": {role: aggregate(names) for role, names in roles.items()},
        "summary": aggregate(list(layers)),
    }


def analyze_models(
    base: nn.Module,
    tuned: nn.Module,
    rank: int,
    names: Iterable[str] | None = None,
    **options,
) -> dict:
    """:func:`analyze_weight_pairs` for a base model and a fine-tuned model or PEFT model of any method.

    Args:
        base: the pre-trained model.
        tuned: a fine-tuned plain model, or a PEFT model (merged into a copy; the model is untouched).
        rank: subspace size (PiCa's ``rank``).
        names: module paths to analyse (default: the linear modules of the numbered blocks).
        **options: ``top_k``, ``epsilon``, ``epsilons``.
    """
    return analyze_weight_pairs(weight_pairs(base, tuned, names), rank, **options)
