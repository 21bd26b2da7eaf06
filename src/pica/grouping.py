"""Which targeted layers share one ``M``: the *role* of a module path.

A role is the module path with the index of each *repetition* replaced by ``*``: the layer index
(``model.layers.3.self_attn.q_proj`` → ``model.layers.*.self_attn.q_proj``) and the expert index of a
mixture of experts. Other numbers are positions and name distinct roles: in a block whose MLP is an
``nn.Sequential`` (``ff.0`` Linear, ``ff.1`` GELU, ``ff.2`` Linear) ``ff.0`` and ``ff.2`` are two roles.
:func:`roles` tells the two apart from the model's structure: a numbered component is a repetition
when the modules it numbers are of one class (for a targeted layer that is itself numbered: all its
numbered siblings; above it: the modules at that position of every layer of the role). Leaf names
alone are not enough: BERT has both ``attention.output.dense`` and ``output.dense``, and multimodal
models have a ``q_proj`` in each tower.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

from .naming import parse_module_path

__all__ = ["group_of", "roles", "update_key", "validate_groups"]


def group_of(module_name: str, share_across_layers: bool) -> str:
    """The group key of a module path with *every* number wildcarded (pica 0.1's roles; :func:`roles`
    keeps the numbers that are positions, which needs the model).

    Args:
        module_name: dotted module path, e.g. ``model.layers.3.self_attn.q_proj``.
        share_across_layers: if False every module is its own group.

    Returns:
        ``model.layers.*.self_attn.q_proj`` (shared) or ``module_name`` itself (unshared).
    """
    if not share_across_layers:
        return module_name
    return parse_module_path(module_name).role


def roles(names: Sequence[str], class_of: Callable[[str], str], numbered_children: Callable[[str], list[str]],
          share_across_layers: bool = True) -> dict[str, str]:
    """The group key of each targeted module, from the model's structure (see the module docstring).

    Args:
        names: dotted paths of the targeted modules.
        class_of: path → class name of the module there.
        numbered_children: path → class names of that module's numbered children (``nn.ModuleList``,
            ``nn.Sequential`` entries).
        share_across_layers: if False every module is its own group.

    Returns:
        module path → role, e.g. ``model.layers.*.self_attn.q_proj``, ``blocks.*.ff.0``.
    """
    if not share_across_layers:
        return {name: name for name in names}
    candidates: dict[str, list[list[str]]] = {}  # every number wildcarded → the members' components
    for name in names:
        candidates.setdefault(group_of(name, True), []).append(name.split("."))
    result = {}
    for members in candidates.values():
        positions = [i for i, part in enumerate(members[0]) if part.isdecimal()]
        kept = set()
        for i in positions:
            if i == len(members[0]) - 1:  # the targeted layer is itself numbered: are all its siblings alike?
                uniform = all(len(set(numbered_children(".".join(parts[:i])))) == 1 for parts in members)
            else:  # a block above it: the same class at this position in every layer of the role?
                uniform = len({class_of(".".join(parts[:i + 1])) for parts in members}) == 1
            if not uniform:
                kept.add(i)
        for parts in members:
            result[".".join(parts)] = ".".join("*" if i in positions and i not in kept else part
                                               for i, part in enumerate(parts))
    return result


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
