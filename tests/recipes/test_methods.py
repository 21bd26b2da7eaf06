"""Every method on the same tiny classifier: what is trainable, and the adapter/head split."""

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification

from pica.recipes.config import METHODS, RecipeConfig
from pica.recipes.heads import default_head_modules
from pica.recipes.methods import apply_method, parameter_split, target_modules_for
from pica.tuner.layer import PiCaLayer
from tests.harness_fixtures import save_tiny_bert

HIDDEN, INTERMEDIATE, LAYERS, RANK, CLASSES = 32, 64, 2, 4, 3


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return save_tiny_bert(tmp_path_factory.mktemp("bert"))


def _model(bert_dir):
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(bert_dir, num_labels=CLASSES)


def test_default_targets_and_head(bert_dir):
    model = _model(bert_dir)
    assert default_head_modules(model, "classification") == ["classifier"]
    assert default_head_modules(model, "generative") == []
    assert "query" in target_modules_for(model, RecipeConfig())
    assert target_modules_for(model, RecipeConfig(target_modules=["value"])) == ["value"]


def test_features_is_not_a_trainer_method(bert_dir):
    # features fits a logistic regression on frozen features (pica.recipes.features), no model to adapt
    with pytest.raises(ValueError, match="unknown method 'features'"):
        apply_method(_model(bert_dir), "features", RecipeConfig(rank=RANK), "classification")


@pytest.mark.parametrize("method", [m for m in METHODS if m != "features"])
def test_parameter_split_per_method(bert_dir, method):
    model = apply_method(_model(bert_dir), method, RecipeConfig(rank=RANK), "classification")
    split = parameter_split(model, ["classifier"])
    head = HIDDEN * CLASSES + CLASSES
    assert split["head"] == head
    # in-features / out-features of the targeted roles: query, key, value, attention.output.dense (32→32),
    # intermediate.dense (32→64), output.dense (64→32)
    shapes = [(HIDDEN, HIDDEN)] * 4 + [(HIDDEN, INTERMEDIATE), (INTERMEDIATE, HIDDEN)]
    expected = {
        "pica": RANK * sum(out for _, out in shapes),  # one M per role, independent of depth
        "lora": LAYERS * RANK * sum(i + o for i, o in shapes),
        "pissa": LAYERS * RANK * sum(i + o for i, o in shapes),
        "dora": LAYERS * (RANK * sum(i + o for i, o in shapes) + sum(o for _, o in shapes)),
        "probe": 0,
    }
    if method in expected:
        assert split["adapter"] == expected[method]
    elif method == "full":
        assert split["adapter"] == split["model_total"] - head
    else:  # vera: per-layer scaling vectors d (rank) and b (out)
        assert split["adapter"] == LAYERS * sum(RANK + o for _, o in shapes)
    assert split["total"] == split["adapter"] + split["head"]
    assert isinstance(model, PeftModel) == (method not in ("full", "probe"))


def test_no_share_and_random_subspace_reach_pica(bert_dir):
    model = apply_method(_model(bert_dir), "pica", RecipeConfig(rank=RANK, share=False, subspace="random"),
                         "classification")
    config = model.peft_config["default"]
    assert config.share_across_layers is False and config.subspace == "random"
    assert parameter_split(model, ["classifier"])["adapter"] == LAYERS * RANK * (4 * HIDDEN + INTERMEDIATE + HIDDEN)
    assert any(isinstance(m, PiCaLayer) for m in model.modules())


def test_probe_freezes_encoder_and_one_step_changes_only_head(bert_dir):
    model = apply_method(_model(bert_dir), "probe", RecipeConfig(), "classification")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    output = model(input_ids=torch.tensor([[2, 5, 6, 3]]), labels=torch.tensor([1]))
    output.loss.backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"classifier.weight", "classifier.bias"}
