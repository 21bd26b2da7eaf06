"""Recipe resolution: defaults < file < flags; unknown keys and bad values are named."""

import json

import pytest

from pica.recipes.config import RecipeConfig, RecipeError, load_recipe_file, resolve_recipe


def test_file_then_flags_override(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: some/dir\nrank: 64\nlr: 0.0005\nmethod: lora\nseeds: 3\n")
    resolved = resolve_recipe(recipe, {"rank": 8, "lr": None})
    assert (resolved.rank, resolved.lr, resolved.methods, resolved.seeds) == (8, 5e-4, ["lora"], [3])
    assert resolved.epochs == RecipeConfig().epochs
    (tmp_path / "r.json").write_text(json.dumps({"rank": 4, "methods": ["pica", "full"]}))
    assert resolve_recipe(tmp_path / "r.json").methods == ["pica", "full"]


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("rnak: 3\n", r"r.yaml: unknown key\(s\) \['rnak'\]"),
        ("rank: three\n", r"r.yaml: rank must be an integer"),
        ("lr: [1]\n", r"lr must be a number"),
        ("share: 1\n", r"share must be true or false"),
        ("method: [pica, adalora]\n", r"unknown method\(s\) \['adalora'\]"),
        ("subspace: bottom\n", r"subspace must be one of"),
        ("per_method: {full: {lrr: 1}}\n", r"per_method.full: unknown or not overridable key\(s\) \['lrr'\]"),
        ("per_method: {full: {output_dir: x}}\n", r"per_method.full: unknown or not overridable"),
        ("rank: 0\n", r"rank must be ≥ 1"),
        ("- a\n- b\n", r"top level must be a mapping"),
        ("a: [\n", r"cannot parse"),
    ],
)
def test_bad_recipes_name_the_key_and_file(tmp_path, content, match):
    (tmp_path / "r.yaml").write_text(content)
    with pytest.raises(RecipeError, match=match):
        resolve_recipe(tmp_path / "r.yaml")


def test_missing_recipe_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_recipe_file(tmp_path / "nope.yaml")


def test_for_method_applies_per_method_overrides():
    recipe = RecipeConfig(methods=["pica", "full"], lr=1e-3, per_method={"full": {"lr": 5e-5, "epochs": 3}})
    full = recipe.for_method("full")
    assert (full.lr, full.epochs, full.methods, full.per_method) == (5e-5, 3.0, ["full"], {})
    assert recipe.for_method("pica").lr == 1e-3


def test_every_shipped_recipe_resolves():
    from pathlib import Path

    recipes = sorted((Path(__file__).parents[2] / "recipes").glob("*.yaml"))
    assert len(recipes) >= 5
    for path in recipes:
        resolved = resolve_recipe(path)
        assert resolved.task in ("classify", "image-classify", "math", "commonsense"), path
