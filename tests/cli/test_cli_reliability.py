"""Issue 16 (reliability): outputs never replace inputs, hostile or odd files give messages naming
the file (not tracebacks, hangs or RecursionErrors), and what a run records works from any folder."""

import json
import os
import re
import shutil
import time

import pytest
import yaml

from pica.cli import main
from pica.io import AdapterFileError, OutputWouldDeleteInputError, read_json_object, refuse_replacing_inputs
from pica.recipes.config import RecipeError, load_recipe_file
from tests.harness_fixtures import save_tiny_bert, sentiment_rows, write_jsonl

DEEP = 100_000  # levels of [[[...]]]: far beyond Python's recursion limit


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A PiCa and a LoRA run trained from inside their folder with *relative* model and data paths."""
    root = tmp_path_factory.mktemp("reliability")
    save_tiny_bert(root / "bert")
    write_jsonl(root / "train.jsonl", sentiment_rows(16))
    write_jsonl(root / "test.jsonl", sentiment_rows(8, seed=1))
    before = os.getcwd()
    os.chdir(root)
    try:
        for method in ("pica", "lora"):
            status = main(["--no-progress", "train", "--model", "bert", "--train-data", "train.jsonl",
                           "--eval-data", "test.jsonl", "--method", method, "--rank", "2", "--max-steps", "1",
                           "--batch-size", "8", "--max-length", "16", "--output-dir", f"out-{method}"])
            assert status == 0
    finally:
        os.chdir(before)
    return {"root": root, "model": root / "bert", "test": root / "test.jsonl", "train": root / "train.jsonl",
            "pica": root / "out-pica" / "pica" / "seed0", "lora": root / "out-lora" / "lora" / "seed0"}


def _error(capsys) -> str:
    return capsys.readouterr().err


def _copy_run(runs, tmp_path, method="pica"):
    return shutil.copytree(runs[method], tmp_path / "run")


# --- 7: --overwrite never deletes an input -------------------------------------------------------


def test_refuse_replacing_inputs_resolves_paths_and_allows_outputs_inside_inputs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "work" / "model").mkdir(parents=True)
    (tmp_path / "data.jsonl").write_text("{}\n")
    (tmp_path / "link").symlink_to(tmp_path / "work")
    refuse_replacing_inputs(tmp_path / "work" / "model" / "eval", {"model": "work/model"})  # inside: fine
    refuse_replacing_inputs(tmp_path / "missing", {"model": "work/model"})  # nothing to replace
    refuse_replacing_inputs(tmp_path / "work", {"model": "no/such/hub-id", "data": None})
    cases = [("work", {"model": "work/model"}, "contains the model"),
             ("link", {"model": str(tmp_path / "work" / "model")}, "contains the model"),
             ("work", {"model": "link/model"}, "contains the model"),
             ("data.jsonl", {"train_data": "data.jsonl"}, "is the train_data"),
             (".", {}, "is the current working directory"),
             ("..", {}, "contains the current working directory")]
    for out, inputs, match in cases:
        with pytest.raises(OutputWouldDeleteInputError, match=match) as info:
            refuse_replacing_inputs(out, inputs, "output_dir")
        assert str(info.value).startswith(f"output_dir: refusing to replace {out}")


@pytest.mark.parametrize("output", [".", "..", "bert", "link-to-bert", "train.jsonl", "recipes"])
def test_train_overwrite_refuses_an_output_dir_that_holds_an_input(runs, tmp_path, monkeypatch, capsys, output):
    work = tmp_path / "work"
    shutil.copytree(runs["model"], work / "bert")
    shutil.copy(runs["train"], work / "train.jsonl")
    (work / "recipes").mkdir()
    (work / "recipes" / "r.yaml").write_text("max_steps: 1\n")
    (work / "link-to-bert").symlink_to(work / "bert")
    monkeypatch.chdir(work)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    status = main(["--no-progress", "train", "--recipe", "recipes/r.yaml", "--model", "bert", "--train-data",
                   "train.jsonl", "--eval-data", "train.jsonl", "--output-dir", output, "--overwrite"])
    assert status == 2
    assert "refusing to replace" in _error(capsys)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_eval_and_export_overwrite_refuse_the_run_they_read(runs, tmp_path, capsys):
    run = _copy_run(runs, tmp_path)
    eval_args = ["--no-progress", "eval", str(run), "--eval-data", str(runs["test"]), "--overwrite"]
    for output in (run, run / "adapter", tmp_path, runs["model"]):
        assert main([*eval_args, "--output-dir", str(output)]) == 2
        assert "refusing to replace" in _error(capsys)
        assert main(["export", str(run), "--to", "lora", "--out", str(output), "--overwrite"]) == 2
        assert "refusing to replace" in _error(capsys)
    assert (run / "adapter" / "adapter_config.json").is_file() and (runs["model"] / "config.json").is_file()
    (run / "eval").mkdir()  # a subdirectory of the run being read is a fine output
    assert main([*eval_args, "--output-dir", str(run / "eval")]) == 0
    assert (run / "eval" / "results.json").is_file() and (run / "adapter" / "adapter_config.json").is_file()


def test_analyze_overwrite_refuses_its_inputs(runs, tmp_path, capsys):
    run = _copy_run(runs, tmp_path)
    for output, base in ((run, None), (runs["model"], None), (runs["model"], str(runs["model"]))):
        args = ["analyze", str(run), "--out", str(output), "--overwrite", *(["--base", base] if base else [])]
        assert main(args) == 2
        assert "refusing to replace" in _error(capsys)
    assert (run / "adapter" / "adapter_config.json").is_file()


def test_library_export_overwrite_refuses_the_base_model_and_cwd(runs, tmp_path, monkeypatch):
    import pica
    from pica.recipes.saved import find_saved, load_saved

    directory, kind, info = find_saved(runs["pica"])
    model = load_saved(directory, kind, "classification", model=None, gguf_file=None, dtype="float32",
                       options=info["task_options"], pad_token_id=0)
    for export in (pica.export_lora, pica.export_merged):
        with pytest.raises(OutputWouldDeleteInputError, match="base model"):
            export(model, runs["model"], overwrite=True)
        monkeypatch.chdir(tmp_path)
        with pytest.raises(OutputWouldDeleteInputError, match="current working directory"):
            export(model, tmp_path, overwrite=True)
    assert (runs["model"] / "config.json").is_file()


# --- 12: deep nesting is a file error, not a RecursionError --------------------------------------


def test_deeply_nested_json_is_an_adapter_file_error(tmp_path):
    for depth in (150, DEEP):
        path = tmp_path / f"deep{depth}.json"
        path.write_text('{"a": ' + "[" * depth + "]" * depth + "}")
        with pytest.raises(AdapterFileError, match=re.escape(str(path)) + ".*nested too deeply"):
            read_json_object(path)


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
@pytest.mark.parametrize("depth", [50, DEEP])
def test_deeply_nested_recipe_is_a_recipe_error(tmp_path, suffix, depth):
    path = tmp_path / f"recipe{suffix}"
    nested = "[" * depth + "]" * depth
    path.write_text(f"target_modules: {nested}\n" if suffix == ".yaml" else f'{{"target_modules": {nested}}}')
    with pytest.raises(RecipeError, match=re.escape(str(path)) + ".*nested too deeply"):
        load_recipe_file(path)


@pytest.mark.parametrize("name", ["adapter_config.json", "run.json"])
def test_eval_of_a_deeply_nested_run_file_names_the_file(runs, tmp_path, capsys, name):
    run = _copy_run(runs, tmp_path)
    target = run / "adapter" / name if name == "adapter_config.json" else run / name
    target.write_text('{"a": ' + "[" * DEEP + "]" * DEEP + "}")
    assert main(["--no-progress", "eval", str(run), "--eval-data", str(runs["test"])]) == 2
    assert re.search(re.escape(str(target)) + ".*nested too deeply", _error(capsys))


# --- 14: messages, not tracebacks ----------------------------------------------------------------


def test_analyze_of_an_untrained_pica_adapter_writes_an_empty_report(runs, tmp_path, caplog):
    from peft import get_peft_model
    from transformers import AutoModelForSequenceClassification

    from pica import PiCaConfig

    base = AutoModelForSequenceClassification.from_pretrained(str(runs["model"]), num_labels=2)
    config = PiCaConfig(rank=2, target_modules=["query", "value"], task_type="SEQ_CLS")
    get_peft_model(base, config).save_pretrained(tmp_path / "zero")
    assert main(["analyze", str(tmp_path / "zero"), "--out", str(tmp_path / "an")]) == 0
    report = json.loads((tmp_path / "an" / "report.json").read_text())
    assert report["summary"]["changed_layers"] == 0 and report["layers"]
    assert {p.name for p in (tmp_path / "an").glob("*.png")} == {"energy_fraction.png", "intruders.png",
                                                                   "intruders_sweep.png"}
    assert "no layer changed" in caplog.text


@pytest.mark.parametrize("with_model", [False, True])
def test_eval_of_an_adapter_directory_without_run_json(runs, tmp_path, capsys, caplog, with_model):
    adapter = shutil.copytree(runs["pica"] / "adapter", tmp_path / "adapter")
    assert not (adapter / "run.json").exists()
    extra = ["--model", str(runs["model"])] if with_model else []
    assert main(["--no-progress", "eval", str(adapter), "--eval-data", str(runs["test"]), *extra]) == 0
    assert json.loads(capsys.readouterr().out)["examples"] == 8
    assert "has no run.json: labels [0, 1] inferred" in caplog.text


def test_eval_of_a_generative_task_on_a_classifier_adapter_is_refused(runs, tmp_path, capsys):
    adapter = shutil.copytree(runs["pica"] / "adapter", tmp_path / "adapter")
    assert main(["--no-progress", "eval", str(adapter), "--eval-data", str(runs["test"]), "--task", "math"]) == 2
    assert "holds a SEQ_CLS (classification) adapter" in _error(capsys)


@pytest.mark.parametrize(
    ("content", "match"),
    [("{not json", "is not valid JSON"), ('{"model": 3}', "model must be a str"),
     ('{"dtype": "float64"}', "dtype must be one of"), ('["a list"]', "must hold a JSON object")],
)
def test_invalid_run_json_is_a_message_naming_it(runs, tmp_path, capsys, content, match):
    run = _copy_run(runs, tmp_path)
    (run / "run.json").write_text(content)
    for args in (["eval", str(run), "--eval-data", str(runs["test"])],
                 ["export", str(run), "--to", "lora", "--out", str(tmp_path / "x")],
                 ["analyze", str(run), "--out", str(tmp_path / "x")]):
        assert main(["--no-progress", *args]) == 2
        error = _error(capsys)
        assert str(run / "run.json") in error and match in error


def test_existing_file_as_output_dir_is_a_message(runs, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("a file")
    commands = [["train", "--model", str(runs["model"]), "--train-data", str(runs["train"]), "--eval-data",
                 str(runs["test"]), "--output-dir", str(taken)],
                ["eval", str(runs["pica"]), "--eval-data", str(runs["test"]), "--output-dir", str(taken)],
                ["export", str(runs["pica"]), "--to", "lora", "--out", str(taken)],
                ["analyze", str(runs["pica"]), "--out", str(taken)]]
    for args in commands:
        assert main(["--no-progress", *args, "--overwrite"]) == 2
        assert "exists and is not a directory" in _error(capsys)
    assert taken.read_text() == "a file"


def test_csv_with_long_fields_and_a_bom(tmp_path, monkeypatch):
    from pica.recipes import data_files
    from pica.recipes.tasks import get_task

    classify = get_task("classify")
    path = tmp_path / "long.csv"
    long_text = "good " * 40_000  # 200K characters: over the csv module's default limit of 128K
    path.write_text(f"\ufeffsentence,label\n\"{long_text}\",1\nbad,0\n", encoding="utf-8")
    examples = classify.load_examples(path)  # BOM skipped: 'sentence' is found as the text field
    assert [len(e["text"]) for e in examples] == [len(long_text), 3]
    monkeypatch.setattr(data_files, "CSV_FIELD_LIMIT", 1000)
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: malformed CSV: field larger than field limit")):
        classify.load_examples(path)


def test_jsonl_with_a_bom_and_deep_rows(tmp_path):
    from pica.recipes.data_files import iter_rows

    path = tmp_path / "bom.jsonl"
    path.write_text('\ufeff{"sentence": "good", "label": 1}\n', encoding="utf-8")
    assert list(iter_rows(path)) == [(f"{path}:1", {"sentence": "good", "label": 1})]
    path.write_text('{"a": 1}\n{"a": ' + "[" * DEEP + "]" * DEEP + "}\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: JSON nested too deeply")):
        list(iter_rows(path))


def test_export_of_a_lora_run_says_it_is_lora(runs, tmp_path, capsys):
    assert main(["export", str(runs["lora"]), "--to", "lora", "--out", str(tmp_path / "x")]) == 2
    error = _error(capsys)
    assert "holds a LORA adapter, not a PiCa one" in error and "already a PEFT LoRA adapter" in error


def test_library_export_of_a_lora_adapter_says_it_is_lora(runs):
    from pica import export_lora
    from pica.recipes.saved import find_saved, load_saved

    directory, kind, info = find_saved(runs["lora"])
    model = load_saved(directory, kind, "classification", model=None, gguf_file=None, dtype="float32",
                       options=info["task_options"], pad_token_id=0)
    with pytest.raises(ValueError, match="adapter 'default' is a LORA adapter, not PiCa"):
        export_lora(model, "unused")


@pytest.mark.parametrize("error", [PermissionError(13, "Permission denied", "/data/x.jsonl"),
                                   IsADirectoryError(21, "Is a directory", "/data"),
                                   AdapterFileError("/a/adapter_config.json is empty")])
def test_user_errors_are_messages_and_verbose_adds_the_traceback(monkeypatch, capsys, error):
    from pica.cli import commands

    def fail(args):
        raise error

    monkeypatch.setattr(commands, "run_eval", fail)
    assert main(["eval", "somewhere"]) == 2
    captured = capsys.readouterr().err
    assert captured.startswith("pica eval: error: ") and "Traceback" not in captured
    assert str(error) in captured
    assert main(["-v", "eval", "somewhere"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_recipe_that_is_a_directory_or_not_utf8(tmp_path, capsys):
    (tmp_path / "dir.yaml").mkdir()
    (tmp_path / "latin.yaml").write_bytes(b"model: caf\xe9\n")
    for name, match in (("dir.yaml", "not a regular file"), ("latin.yaml", "not UTF-8")):
        assert main(["train", "--recipe", str(tmp_path / name)]) == 2
        assert re.search(re.escape(str(tmp_path / name)) + ".*" + match, _error(capsys))


# --- 15: recorded paths are absolute; head_modules as used ---------------------------------------


def test_relative_paths_are_recorded_absolute_and_eval_works_elsewhere(runs, tmp_path, monkeypatch, capsys):
    info = json.loads((runs["pica"] / "run.json").read_text())
    assert info["model"] == str(runs["model"])
    adapter = json.loads((runs["pica"] / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(runs["model"])
    config = yaml.safe_load((runs["root"] / "out-pica" / "config.yaml").read_text())
    assert config["train_data"] == str(runs["train"]) and config["eval_data"] == str(runs["test"])
    monkeypatch.chdir(tmp_path)
    assert main(["--no-progress", "eval", str(runs["pica"]), "--eval-data", str(runs["test"])]) == 0
    assert json.loads(capsys.readouterr().out)["examples"] == 8


def test_hub_ids_are_kept_as_written():
    from pica.recipes.models import absolute_if_local

    assert absolute_if_local("org/some-model") == "org/some-model" and absolute_if_local(None) is None


@pytest.mark.parametrize("method", ["pica", "lora"])
def test_run_json_head_modules_are_the_ones_used(runs, method):
    info = json.loads((runs[method] / "run.json").read_text())
    results = json.loads((runs[method] / "results.json").read_text())
    assert info["head_modules"] == results["head_modules"] == ["classifier"]


# --- 17: bounded recipes --------------------------------------------------------------------------


def test_yaml_alias_bomb_is_refused_at_once(tmp_path):
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 10)]  # 9^10 items
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\ntarget_modules: *l9\n")
    started = time.perf_counter()
    with pytest.raises(RecipeError, match=re.escape(str(path)) + ".*aliases"):
        load_recipe_file(path)
    assert time.perf_counter() - started < 5


def test_single_alias_is_refused_too_and_huge_recipes(tmp_path):
    path = tmp_path / "alias.yaml"
    path.write_text("target_modules: &t [query]\nhead_modules: *t\n")
    with pytest.raises(RecipeError, match="aliases"):
        load_recipe_file(path)
    path = tmp_path / "huge.json"
    path.write_text('{"model": "' + "x" * (2 << 20) + '"}')
    with pytest.raises(RecipeError, match=re.escape(str(path)) + ".*too large"):
        load_recipe_file(path)


@pytest.mark.parametrize("levels", [30, 60000])
def test_deeply_nested_json_flag_is_a_usage_error(levels, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--task-options", "[" * levels + "]" * levels])
    assert exit_info.value.code == 2 and "nested too deeply" in capsys.readouterr().err
