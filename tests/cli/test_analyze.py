"""``pica analyze``: every input form (train output, run dir, adapter, model pair), measures that follow
from the construction (PiCa's ΔW lies in W0's top-r subspace; a planted off-range rank-1 update is an
intruder), clear errors and an atomic output directory."""

import json

import pytest
import torch
import yaml
from transformers import BertModel

from pica.cli import build_parser, main
from tests.harness_fixtures import save_tiny_bert, sentiment_rows, write_jsonl


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny `pica train` comparison (PiCa rank 4, LoRA rank 4), 3 steps each."""
    root = tmp_path_factory.mktemp("analyze")
    model = save_tiny_bert(root / "bert")
    train = write_jsonl(root / "train.jsonl", sentiment_rows(32))
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"task": "classify", "model": str(model), "train_data": str(train),
                                      "eval_data": str(train), "eval_limit": 8, "rank": 4, "lr": 0.05,
                                      "max_steps": 3, "batch_size": 8, "max_length": 16}))
    status = main(["--no-progress", "train", "--recipe", str(recipe), "--method", "pica", "lora",
                   "--output-dir", str(root / "out")])
    assert status == 0
    return {"root": root, "model": model, "out": root / "out"}


def _report(path):
    return json.loads(path.read_text())


def test_help_lists_analyze_and_its_options():
    text = build_parser()._subparsers._group_actions[0].choices["analyze"].format_help()
    for flag in ("--base", "--out", "--rank", "--top-k", "--epsilon", "--epsilons", "--overwrite"):
        assert flag in text


def test_train_output_dir_analyses_every_saved_run(trained, tmp_path, capsys):
    out = tmp_path / "an"
    assert main(["analyze", str(trained["out"]), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "pica/seed0" in printed and "lora/seed0" in printed and "intruders" in printed
    pica_report = _report(out / "pica" / "seed0" / "report.json")
    lora_report = _report(out / "lora" / "seed0" / "report.json")
    assert pica_report["settings"]["rank"] == 4  # the PiCa adapter's own rank
    assert lora_report["settings"]["rank"] == 16  # default for other methods
    # PiCa's ΔW = M P lies in P's row space, which is W0's top-4 right singular subspace.
    assert pica_report["summary"]["changed_layers"] == 12
    assert pica_report["summary"]["energy_fraction"] == pytest.approx(1.0, abs=1e-6)
    assert lora_report["summary"]["changed_layers"] == 12
    assert lora_report["summary"]["energy_fraction"] < 0.99
    assert set(pica_report["summary"]["intruders_sweep"]) == {"0.3", "0.4", "0.5", "0.6", "0.7", "0.8", "0.9"}
    summary = _report(out / "summary.json")
    assert set(summary) == {"pica/seed0", "lora/seed0"}
    for name in ("energy_fraction.png", "intruders.png", "intruders_sweep.png"):
        assert (out / "pica" / "seed0" / name).stat().st_size > 1000


def test_adapter_dir_with_explicit_rank_and_epsilons(trained, tmp_path):
    adapter = trained["out"] / "lora" / "seed0" / "adapter"
    out = tmp_path / "an"
    assert main(["analyze", str(adapter), "--rank", "2", "--top-k", "3", "--epsilon", "0.45",
                 "--epsilons", "0.2", "0.8", "--out", str(out)]) == 0
    report = _report(out / "report.json")
    assert report["settings"] == {"rank": 2, "top_k": 3, "epsilon": 0.45, "epsilons": [0.2, 0.45, 0.8]}
    assert report["inputs"]["kind"] == "adapter" and report["inputs"]["base"] == str(trained["model"])
    layer = next(iter(report["layers"].values()))
    assert len(layer["intruder_max_cosines"]) == 3 and layer["rank"] == 2


def _planted_model(base_dir, out_dir):
    """The base with two planted updates: layer 0 query gets ΔW in W0's top-4 right subspace; layer 1
    intermediate.dense (64×32) gets a dominant rank-1 update whose output direction is orthogonal to
    W0's column space (so it is an intruder at any ε)."""
    model = BertModel.from_pretrained(base_dir)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        query = model.encoder.layer[0].attention.self.query.weight  # (32, 32)
        vh = torch.linalg.svd(query.double())[2][:4]  # (4, 32)
        query += (torch.randn(32, 4, generator=generator, dtype=torch.float64) @ vh).float() * 0.1
        dense = model.encoder.layer[1].intermediate.dense.weight  # (64, 32)
        u = torch.linalg.svd(dense.double(), full_matrices=True)[0][:, 40]  # (64,) ⟂ column space of W0
        v = torch.nn.functional.normalize(torch.randn(32, generator=generator, dtype=torch.float64), dim=0)
        dense += (10 * torch.linalg.matrix_norm(dense.double(), 2) * torch.outer(u, v)).float()
    model.save_pretrained(out_dir)
    return out_dir


def test_model_pair_measures_follow_the_construction(trained, tmp_path):
    tuned = _planted_model(trained["model"], tmp_path / "tuned")
    out = tmp_path / "an"
    assert main(["analyze", str(tuned), "--base", str(trained["model"]), "--rank", "4", "--out", str(out)]) == 0
    report = _report(out / "report.json")
    layers = report["layers"]
    assert report["summary"]["changed_layers"] == 2
    assert layers["encoder.layer.0.attention.self.query"]["energy_fraction"] == pytest.approx(1.0, abs=1e-5)
    planted = layers["encoder.layer.1.intermediate.dense"]
    assert planted["intruders"]["0.3"] >= 1 and min(planted["intruder_max_cosines"]) < 0.05
    assert layers["encoder.layer.1.attention.self.key"]["energy_fraction"] is None  # unchanged → null
    changed = [layer for layer in layers.values() if layer["delta_norm"] > 0]
    assert report["summary"]["intruders"] == sum(layer["intruders"]["0.5"] for layer in changed)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["{root}/missing"], "directory not found: .*missing"),
        (["{model}", "--base", "{root}/nobase"], "--base directory not found: .*nobase"),
        (["{model}"], "pass --base"),
        (["{adapter}", "--rank", "0"], "--rank must be ≥ 1"),
        (["{adapter}", "--epsilon", "1.5"], r"--epsilon must be in \(0, 1\]"),
        (["{root}"], "neither a peft adapter"),
    ],
)
def test_bad_input_is_a_clear_error_and_writes_nothing(trained, tmp_path, capsys, args, match):
    values = {"root": str(tmp_path), "model": str(trained["model"]),
              "adapter": str(trained["out"] / "pica" / "seed0")}
    args = [a.format(**values) for a in args]
    assert main(["analyze", *args, "--out", str(tmp_path / "an")]) == 2
    assert __import__("re").search(match, capsys.readouterr().err)
    assert not (tmp_path / "an").exists() and not list(tmp_path.glob(".an*"))


def test_existing_out_needs_overwrite(trained, tmp_path, capsys):
    adapter = str(trained["out"] / "pica" / "seed0")
    out = tmp_path / "an"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    assert main(["analyze", adapter, "--out", str(out)]) == 2
    assert "exists and is not empty; pass --overwrite" in capsys.readouterr().err and (out / "keep.txt").exists()
    assert main(["analyze", adapter, "--out", str(out), "--overwrite"]) == 0
    assert (out / "report.json").is_file() and not (out / "keep.txt").exists()
