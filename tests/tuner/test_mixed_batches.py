"""Mixed-adapter batches (issue 18): ``adapter_names=[...]`` gives each row its own adapter in forward and
generate, with peft's semantics (``"__base__"``, adapters of different ranks and targets, refused while
training or merged)."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from transformers import BertConfig, BertForSequenceClassification

from pica import PiCaConfig
from tests.conftest import make_llama, randomize_updates


def _two_adapters():
    model = get_peft_model(make_llama(), PiCaConfig(rank=4))
    model.add_adapter("b", PiCaConfig(rank=2, target_modules=["q_proj", "v_proj"], share_across_layers=False))
    randomize_updates(model, seed=3)
    return model.eval()


def _per_row(model, input_ids, names):
    rows = []
    for row, name in zip(input_ids, names):
        with torch.no_grad():
            if name == "__base__":
                with model.disable_adapter():
                    rows.append(model(input_ids=row[None]).logits)
            else:
                model.set_adapter(name)
                rows.append(model(input_ids=row[None]).logits)
    model.set_adapter("default")
    return torch.cat(rows)


def test_each_row_gets_its_adapter_in_forward():
    model = _two_adapters()
    input_ids = torch.randint(1, 96, (4, 7), generator=torch.Generator().manual_seed(0))
    names = ["default", "b", "__base__", "b"]
    with torch.no_grad():
        mixed = model(input_ids=input_ids, adapter_names=names).logits
    expected = _per_row(model, input_ids, names)
    assert torch.allclose(mixed, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(expected[0], expected[2], atol=1e-3)  # the adapters do change the rows
    assert not torch.allclose(expected[1], expected[2], atol=1e-3)
    with torch.no_grad():  # hooks are gone after the call: the active adapter for every row again
        plain = model(input_ids=input_ids).logits
    assert torch.allclose(plain, _per_row(model, input_ids, ["default"] * 4), atol=1e-5, rtol=0)


@pytest.mark.parametrize("num_beams", [1, 2])
def test_each_row_gets_its_adapter_in_generate(num_beams):
    model = _two_adapters()
    input_ids = torch.randint(1, 96, (3, 5), generator=torch.Generator().manual_seed(1))
    names = ["b", "__base__", "default"]
    settings = dict(max_new_tokens=4, do_sample=False, num_beams=num_beams, pad_token_id=0)
    mixed = model.generate(input_ids=input_ids, adapter_names=names, **settings)
    for row, name in zip(range(3), names):
        if name == "__base__":
            with model.disable_adapter():
                alone = model.generate(input_ids=input_ids[row:row + 1], **settings)
        else:
            model.set_adapter(name)
            alone = model.generate(input_ids=input_ids[row:row + 1], **settings)
        length = alone.shape[1]  # a row that ends early (EOS) is padded in the batch
        assert torch.equal(mixed[row, :length], alone[0]) and bool((mixed[row, length:] == 0).all()), (row, name)
    model.set_adapter("default")


def test_modules_to_save_heads_follow_the_rows():
    torch.manual_seed(0)
    base = BertForSequenceClassification(BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=4, intermediate_size=64, num_labels=3)).eval()
    model = get_peft_model(base, PiCaConfig(rank=4, modules_to_save=["classifier"], task_type="SEQ_CLS"))
    model.add_adapter("b", PiCaConfig(rank=4, modules_to_save=["classifier"], task_type="SEQ_CLS"))
    randomize_updates(model, seed=5)
    with torch.no_grad():
        for parameter in model.base_model.model.classifier.modules_to_save["b"].parameters():
            parameter.add_(0.5)
    model.eval()
    input_ids = torch.randint(1, 96, (3, 6), generator=torch.Generator().manual_seed(2))
    names = ["b", "default", "__base__"]
    with torch.no_grad():
        mixed = model(input_ids=input_ids, adapter_names=names).logits
    assert torch.allclose(mixed, _per_row(model, input_ids, names), atol=1e-5, rtol=0)


def test_mixed_batches_are_refused_where_peft_refuses_them():
    model = _two_adapters()
    input_ids = torch.randint(1, 96, (2, 5), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"do not exist: \['nope'\]"):
        model(input_ids=input_ids, adapter_names=["default", "nope"])
    with pytest.raises(ValueError, match="should be the same as the number of inputs, but got 1 and 2"):
        model(input_ids=input_ids, adapter_names=["default"])
    model.train()
    with pytest.raises(ValueError, match="training mode"):
        model(input_ids=input_ids, adapter_names=["default", "b"])
    model.eval()
    model.merge_adapter(["default"])
    with pytest.raises(ValueError, match="merged"):
        model(input_ids=input_ids, adapter_names=["default", "b"])
    model.unmerge_adapter()
    with pytest.raises(ValueError, match="alora_offsets"):
        model(input_ids=input_ids, alora_offsets=[1, 1])
