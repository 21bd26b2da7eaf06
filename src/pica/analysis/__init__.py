"""Spectral analysis of fine-tuning updates: where ΔW lies relative to W0's singular subspaces.

``spectral`` is pure torch (per-matrix measures); ``weights`` collects (W0, W) pairs from models or
adapters of any PEFT method; ``report`` aggregates per layer and per role; ``plots`` (matplotlib)
draws a report. Only ``plots`` imports matplotlib, and only when called.
"""

from .report import analyze_models, analyze_weight_pairs
from .spectral import energy_fraction, intruder_cosines, principal_angles
from .weights import adapted_weights, linear_weights, weight_pairs

__all__ = [
    "adapted_weights",
    "analyze_models",
    "analyze_weight_pairs",
    "energy_fraction",
    "intruder_cosines",
    "linear_weights",
    "principal_angles",
    "weight_pairs",
]
