"""Module paths: their numbered components (layer, expert indices) and their *role*.

Pure Python: imports neither torch, ``peft`` nor ``transformers``.

A numbered component is a dotted part made only of decimal digits, as ``nn.ModuleList`` names its
children. The role of a path is the path with every numbered component replaced by ``*``:
``model.layers.3.self_attn.q_proj`` → ``model.layers.*.self_attn.q_proj``. This is the one parser of
layer indices in the package: PiCa's sharing groups, the analysis roles and plots, and the default
module selection of :func:`pica.analysis.linear_weights` all read paths through it.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["ModulePath", "parse_module_path"]


class ModulePath(NamedTuple):
    """A dotted module path split into its role and its numbered components.

    Attributes:
        role: the path with every numbered component replaced by ``*``.
        indices: the numbered components as ints, outermost first (``()`` if there are none).
    """

    role: str
    indices: tuple[int, ...]

    @property
    def layer(self) -> int | None:
        """The outermost index (the transformer block of ``model.layers.3.mlp.experts.7.up_proj``), or None."""
        return self.indices[0] if self.indices else None


def parse_module_path(module_name: str) -> ModulePath:
    """Split a dotted module path into its role and its layer / expert indices.

    Args:
        module_name: e.g. ``model.layers.2.mlp.experts.7.up_proj``.

    Returns:
        ``ModulePath("model.layers.*.mlp.experts.*.up_proj", (2, 7))``.
    """
    parts = module_name.split(".")
    numbered = [part.isdecimal() for part in parts]
    role = ".".join("*" if is_index else part for part, is_index in zip(parts, numbered))
    return ModulePath(role, tuple(int(part) for part, is_index in zip(parts, numbered) if is_index))
