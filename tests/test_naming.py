"""pica.naming: the one parser of layer indices in module paths (pure Python)."""

import re

import pytest

from pica.naming import ModulePath, parse_module_path
from pica.grouping import group_of

NAMES = [
    ("model.layers.3.self_attn.q_proj", "model.layers.*.self_attn.q_proj", (3,)),
    ("bert.encoder.layer.11.attention.output.dense", "bert.encoder.layer.*.attention.output.dense", (11,)),
    ("model.layers.2.mlp.experts.7.up_proj", "model.layers.*.mlp.experts.*.up_proj", (2, 7)),
    ("vision_tower.layers.0.q_proj", "vision_tower.layers.*.q_proj", (0,)),
    ("h.0.attn.c_attn", "h.*.attn.c_attn", (0,)),
    ("classifier", "classifier", ()),
    ("layer1.q_proj", "layer1.q_proj", ()),  # a number inside a name is not an index
    ("12", "*", (12,)),
    ("", "", ()),
]


@pytest.mark.parametrize(("name", "role", "indices"), NAMES)
def test_role_and_indices(name, role, indices):
    path = parse_module_path(name)
    assert path == ModulePath(role, indices)
    assert path.layer == (indices[0] if indices else None)


@pytest.mark.parametrize(("name", "role", "indices"), NAMES)
def test_same_answers_as_the_parsers_it_replaces(name, role, indices):
    """The regexes of analysis/plots.py and analysis/weights.py, and PiCa's sharing groups."""
    numbers = re.findall(r"(?:^|\.)(\d+)(?:\.|$)", name)
    assert parse_module_path(name).layer == (int(numbers[0]) if numbers else None)
    assert bool(parse_module_path(name).indices) == bool(re.search(r"(^|\.)\d+(\.|$)", name))
    assert parse_module_path(name).role == group_of(name, share_across_layers=True)


def test_imports_only_the_standard_library():
    import ast
    import sys

    import pica.naming

    tree = ast.parse(open(pica.naming.__file__, encoding="utf-8").read())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 0}
    assert imported <= set(sys.stdlib_module_names) | {"__future__"}
    assert not any(isinstance(node, ast.ImportFrom) and node.level > 0 for node in ast.walk(tree))
