"""Which targeted layers share one ``M``: the *role* of a module path.

A role is the module path with every purely numeric component (layer index, expert index)
replaced by ``*``: ``model.layers.3.self_attn.q_proj`` → ``model.layers.*.self_attn.q_proj``.
Leaf names alone are not enough: BERT has both ``attention.output.dense`` and ``output.dense``, and
multimodal models have a ``q_proj`` in each tower.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from .naming import parse_module_path

__all__ = ["group_of", "update_key", "validate_groups"]


def group_of(module_name: str, share_across_layers: bool) -> str:
    """The group key of a targeted module.

    Args:
        module_name: dotted module path, e.g. ``model.layers.3.self_attn.q_proj``.
        share_across_layers: if False every module is its own group.

    Returns:
        ``model.layers.*.self_attn.q_proj`` (shared) or ``module_name`` itself (unshared).
    """
    if not share_across_layers:
        return module_name
    return parse_module_path(module_name).role


def update_key(group: str) -> str:
    """The key of a group's ``M`` on the tuner and in the adapter file: the group with ``/`` for ``.``.

    ``model.layers.*.self_attn.q_proj`` → ``model/layers/*/self_attn/q_proj``: parameter names cannot
    contain dots, and without dots peft's adapter-name handling leaves the key intact.

    Raises:
        ValueError: the group path already contains ``/`` (the key would be ambiguous).
    """
    if "/" in group:
        raise ValueError(f"PiCa cannot adapt module {group!r}: its path contains '/'")
    return group.replace(".", "/")


def validate_groups(
    module_groups: Mapping[str, str], out_features: Mapping[str, int]
) -> dict[str, list[str]]:
    """Check that all members of each group have the same ``out_features``.

    Args:
        module_groups: module name → group key.
        out_features: module name → its ``out_features``.

    Returns:
        group key → member module names, in the order given.

    Raises:
        ValueError: naming the group and its members with their ``out_features`` when mixed.
    """
    members: dict[str, list[str]] = {}
    for name, group in module_groups.items():
        members.setdefault(group, []).append(name)
    for group, names in members.items():
        sizes = {out_features[name] for name in names}
        if len(sizes) > 1:
            detail = ", ".join(f"{name} (out_features={out_features[name]})" for name in _first(names, 6))
            raise ValueError(
                f"PiCa group '{group}' shares one M but its layers have different out_features {sorted(sizes)}: "
                f"{detail}. Set share_across_layers=False or target these modules separately."
            )
    return members


def _first(names: Iterable[str], count: int) -> list[str]:
    return list(names)[:count]
