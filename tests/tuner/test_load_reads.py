"""One read per load (issue 26): a PiCa load reads ``adapter_config.json`` and ``adapter_model.safetensors``
once each on top of peft's own reads of the config, counted at the readers every route goes through
(Python's ``open`` and safetensors' ``safe_open``, which ``load_file`` uses)."""

from __future__ import annotations

import builtins
import collections
import contextlib
import io
import sys
from collections.abc import Iterator
from pathlib import Path

import safetensors
import torch
from peft import PeftModel, get_peft_model

from pica import PiCaConfig
from tests.conftest import example_inputs, make_llama, model_output, randomize_updates

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


@contextlib.contextmanager
def counted_reads(directory: Path, monkeypatch) -> Iterator[collections.Counter]:
    """Count the opens of the files in ``directory`` (by file name) while the block runs."""
    counts: collections.Counter = collections.Counter()
    directory = directory.resolve()

    def note(file) -> None:
        try:
            path = Path(file).resolve()
        except TypeError:  # a file descriptor
            return
        if path.parent == directory:
            counts[path.name] += 1

    real_open, real_safe_open = builtins.open, safetensors.safe_open

    def counting_open(file, *args, **kwargs):
        note(file)
        return real_open(file, *args, **kwargs)

    def counting_safe_open(file, *args, **kwargs):
        note(file)
        return real_safe_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    monkeypatch.setattr(io, "open", counting_open)
    for module in list(sys.modules.values()):  # every module that imported the name (safetensors.torch, ...)
        if getattr(module, "safe_open", None) is real_safe_open:
            monkeypatch.setattr(module, "safe_open", counting_safe_open)
    try:
        yield counts
    finally:
        monkeypatch.undo()


def _saved(tmp_path: Path, name: str, seed: int, **config) -> tuple[Path, torch.Tensor]:
    model = get_peft_model(make_llama(), PiCaConfig(rank=4, **config))
    randomize_updates(model, seed=seed)
    model.save_pretrained(tmp_path / name)
    return tmp_path / name, model_output(model, example_inputs("llama"))


def test_from_pretrained_reads_config_and_weights_once(tmp_path, monkeypatch):
    path, expected = _saved(tmp_path, "adapter", seed=1)
    base = make_llama()
    with counted_reads(path, monkeypatch) as reads:
        loaded = PeftModel.from_pretrained(base, path)
    assert dict(reads) == {CONFIG: 1, WEIGHTS: 1}  # pica's reads; peft is handed the config and the tensors
    assert torch.equal(model_output(loaded, example_inputs("llama")), expected)


def test_load_adapter_adds_one_read_of_each_file_to_peft_own_config_reads(tmp_path, monkeypatch):
    first, _ = _saved(tmp_path, "first", seed=1)
    second, _ = _saved(tmp_path, "second", seed=2, target_modules=["q_proj"])
    model = PeftModel.from_pretrained(make_llama(), first)
    with counted_reads(second, monkeypatch) as reads:
        model.load_adapter(second, adapter_name="second")
    # peft parses the config twice (its _get_peft_type and PeftConfig.from_pretrained), pica once
    assert dict(reads) == {CONFIG: 3, WEIGHTS: 1}
    model.set_adapter("second")
    reference = get_peft_model(make_llama(), PiCaConfig(rank=4, target_modules=["q_proj"]))
    randomize_updates(reference, seed=2)
    assert torch.equal(model_output(model, example_inputs("llama")), model_output(reference, example_inputs("llama")))
