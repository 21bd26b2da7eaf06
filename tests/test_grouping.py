import pytest

from pica.grouping import group_of, validate_groups


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
