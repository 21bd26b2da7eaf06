import pytest

from pica.grouping import group_of, roles, validate_groups


@pytest.mark.parametrize(
    ("name", "shared", "expected"),
    [
        ("model.layers.3.self_attn.q_proj", True, "model.layers.*.self_attn.q_proj"),
        ("model.layers.3.self_attn.q_proj", False, "model.layers.3.self_attn.q_proj"),
        ("bert.encoder.layer.11.attention.output.dense", True, "bert.encoder.layer.*.attention.output.dense"),
        ("bert.encoder.layer.11.output.dense", True, "bert.encoder.layer.*.output.dense"),
        ("model.layers.2.mlp.experts.7.up_proj", True, "model.layers.*.mlp.experts.*.up_proj"),
        ("vision_tower.layers.0.q_proj", True, "vision_tower.layers.*.q_proj"),
    ],
)
def test_group_of(name, shared, expected):
    assert group_of(name, shared) == expected


def test_bert_dense_roles_and_towers_do_not_share():
    names = ["enc.layer.0.attention.output.dense", "enc.layer.0.output.dense", "vision.layers.0.q_proj",
             "text.layers.0.q_proj"]
    assert len({group_of(name, True) for name in names}) == 4


def test_mixed_out_features_names_the_modules():
    groups = {"a.0.q": "a.*.q", "a.1.q": "a.*.q"}
    with pytest.raises(ValueError, match=r"a\.\*\.q.*a\.0\.q \(out_features=8\).*a\.1\.q \(out_features=16\)"):
        validate_groups(groups, {"a.0.q": 8, "a.1.q": 16})
    assert validate_groups(groups, {"a.0.q": 8, "a.1.q": 8}) == {"a.*.q": ["a.0.q", "a.1.q"]}


def _structure(classes: dict[str, str]):
    """``class_of`` and ``numbered_children`` over a model described as path → class name."""
    def numbered(path: str) -> list[str]:
        prefix = f"{path}." if path else ""
        return [cls for child, cls in classes.items()
                if child.startswith(prefix) and "." not in child[len(prefix):] and child[len(prefix):].isdecimal()]
    return classes.__getitem__, numbered


def test_positions_in_a_sequential_are_roles_repetitions_are_not():
    """Issue: every number used to be wildcarded, so ``ff.0`` and ``ff.2`` of an ``nn.Sequential`` MLP shared one M."""
    classes = {"blocks": "ModuleList"}
    for i in range(3):
        classes |= {f"blocks.{i}": "Block", f"blocks.{i}.ff": "Sequential", f"blocks.{i}.ff.0": "Linear",
                    f"blocks.{i}.ff.1": "GELU", f"blocks.{i}.ff.2": "Linear", f"blocks.{i}.moe": "MoE",
                    f"blocks.{i}.moe.experts": "ModuleList",
                    **{f"blocks.{i}.moe.experts.{e}": "Expert" for e in range(4)},
                    **{f"blocks.{i}.moe.experts.{e}.up": "Linear" for e in range(4)},
                    f"blocks.{i}.pair": "Sequential", f"blocks.{i}.pair.0": "Attention", f"blocks.{i}.pair.1": "MLP",
                    f"blocks.{i}.pair.0.proj": "Linear", f"blocks.{i}.pair.1.proj": "Linear",
                    f"blocks.{i}.linears": "ModuleList", f"blocks.{i}.linears.0": "Linear", f"blocks.{i}.linears.1": "Linear"}
    names = [n for n, c in classes.items() if c == "Linear"]
    found = roles(names, *_structure(classes))
    assert set(found.values()) == {"blocks.*.ff.0", "blocks.*.ff.2", "blocks.*.moe.experts.*.up",
                                   "blocks.*.pair.0.proj", "blocks.*.pair.1.proj", "blocks.*.linears.*"}
    assert roles(names, *_structure(classes), share_across_layers=False) == {n: n for n in names}


def test_a_hybrid_stack_shares_across_the_layers_of_one_kind():
    """Layers of different classes (attention and recurrent blocks) in one list: each role's layers are alike."""
    classes = {"layers": "ModuleList"}
    for i in range(4):
        kind = "AttentionLayer" if i % 2 else "MambaLayer"
        classes[f"layers.{i}"] = kind
        classes[f"layers.{i}.{'q_proj' if i % 2 else 'in_proj'}"] = "Linear"
    names = [n for n, c in classes.items() if c == "Linear"]
    assert set(roles(names, *_structure(classes)).values()) == {"layers.*.q_proj", "layers.*.in_proj"}
