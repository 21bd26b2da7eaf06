"""pica.tuner.integration: atomic saves, no pickle on PiCa load paths, idempotent wrappers that leave
other peft methods alone."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import peft.peft_model
import peft.utils.save_and_load
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers.integrations.peft import PeftAdapterMixin

from pica import PiCaConfig
from pica.io import AdapterFileError
from pica.tuner import integration, loading
from tests.conftest import example_inputs, make_llama, model_output, randomize_updates

ROOT = Path(__file__).resolve().parents[2]


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


def _adapter(seed: int) -> PeftModel:
    model = get_peft_model(make_llama(), PiCaConfig(rank=4))
    randomize_updates(model, seed=seed)
    return model


def _failing_writer(tensors, filename, metadata=None):
    """Write half of a real safetensors file, then fail, as a crash or a full disk would."""
    from safetensors.torch import save

    data = save(tensors, metadata=metadata)
    Path(filename).write_bytes(data[: len(data) // 2])
    raise OSError("injected failure while writing")


@pytest.fixture
def old_adapter(tmp_path) -> tuple[Path, dict[str, bytes], torch.Tensor]:
    path = tmp_path / "adapter"
    model = _adapter(seed=1)
    model.save_pretrained(path)
    return path, _files(path), model_output(model, example_inputs("llama"))


def _assert_previous_adapter_intact(path: Path, files: dict[str, bytes], logits: torch.Tensor) -> None:
    assert _files(path) == files
    loaded = PeftModel.from_pretrained(make_llama(), path)
    assert torch.equal(model_output(loaded, example_inputs("llama")), logits)


def test_failure_while_saving_keeps_previous_adapter(old_adapter, monkeypatch):
    path, files, logits = old_adapter
    monkeypatch.setattr(peft.peft_model, "safe_save_file", _failing_writer)
    with pytest.raises(OSError, match="injected failure"):
        _adapter(seed=2).save_pretrained(path)
    monkeypatch.undo()
    _assert_previous_adapter_intact(path, files, logits)
    assert [p.name for p in path.parent.iterdir()] == ["adapter"]  # staging directory cleaned up


def test_without_the_wrapper_the_same_failure_corrupts_the_adapter(old_adapter, monkeypatch):
    """Control: peft's own save_pretrained leaves a half-written file (so the test above can fail)."""
    path, files, _ = old_adapter
    monkeypatch.setattr(peft.peft_model, "safe_save_file", _failing_writer)
    integration.uninstall()
    try:
        with pytest.raises(OSError, match="injected failure"):
            _adapter(seed=2).save_pretrained(path)
    finally:
        integration.install()
    assert _files(path)["adapter_model.safetensors"] != files["adapter_model.safetensors"]


def test_killed_saving_process_keeps_previous_adapter(old_adapter):
    """A subprocess is SIGKILLed half-way through writing the weights of a new adapter."""
    path, files, logits = old_adapter
    script = textwrap.dedent(
        f"""
        import os, signal
        from pathlib import Path
        import peft, peft.peft_model, pica
        from safetensors.torch import save
        from tests.conftest import make_llama, randomize_updates

        def killed_mid_write(tensors, filename, metadata=None):
            data = save(tensors, metadata=metadata)
            with open(filename, "wb") as handle:
                handle.write(data[: len(data) // 2])
                handle.flush()
                os.kill(os.getpid(), signal.SIGKILL)

        peft.peft_model.safe_save_file = killed_mid_write
        model = peft.get_peft_model(make_llama(), pica.PiCaConfig(rank=4))
        randomize_updates(model, seed=2)
        model.save_pretrained({str(path)!r})
        """
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    assert [p.name for p in path.parent.iterdir()] == ["adapter"]
    leftovers = [p.name for p in path.iterdir() if p.is_dir()]
    assert len(leftovers) == 1 and leftovers[0].startswith(".pica-partial-")  # the dead process's staging, inside
    _assert_previous_adapter_intact(path, files, logits)
    _adapter(seed=3).save_pretrained(path)  # the next save removes what the killed one left
    assert not [p for p in path.iterdir() if p.is_dir()]


def test_save_keeps_other_files_and_updates_model_card(old_adapter):
    path, files, _ = old_adapter
    (path / "optimizer.pt").write_bytes(b"not ours")
    (path / "README.md").write_text("# my notes\n")
    model = _adapter(seed=2)
    model.save_pretrained(path)
    assert (path / "optimizer.pt").read_bytes() == b"not ours"
    assert "my notes" in (path / "README.md").read_text()
    assert _files(path)["adapter_model.safetensors"] != files["adapter_model.safetensors"]
    loaded = PeftModel.from_pretrained(make_llama(), path)
    assert torch.equal(model_output(loaded, example_inputs("llama")), model_output(model, example_inputs("llama")))


def test_named_adapters_are_saved_in_subdirectories(tmp_path):
    model = _adapter(seed=1)
    model.add_adapter("second", PiCaConfig(rank=2))
    model.save_pretrained(str(tmp_path), True)  # save_directory and safe_serialization passed positionally
    assert (tmp_path / "adapter_model.safetensors").is_file()
    assert (tmp_path / "second" / "adapter_config.json").is_file()
    loaded = PeftModel.from_pretrained(make_llama(), tmp_path / "second", adapter_name="second")
    assert loaded.peft_config["second"].rank == 2


class _Bomb:
    """Unpickling this creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture
def pickle_spy(monkeypatch) -> list:
    calls: list = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: (calls.append(a), real(*a, **k))[1])
    return calls


@pytest.mark.parametrize("loader", ["peft", "transformers"])
def test_pickle_bomb_next_to_a_pica_adapter_is_never_touched(loader, old_adapter, pickle_spy):
    path, _, logits = old_adapter
    marker = path.parent / "exploded"
    (path / "adapter_model.bin").write_bytes(pickle.dumps({"x": _Bomb(marker)}))
    if loader == "peft":
        loaded = PeftModel.from_pretrained(make_llama(), path)  # safetensors present: used
        assert torch.equal(model_output(loaded, example_inputs("llama")), logits)
    (path / "adapter_model.safetensors").unlink()  # only the pickle left: refused, not read
    with pytest.raises(AdapterFileError, match="adapter_model.safetensors does not exist"):
        if loader == "peft":
            PeftModel.from_pretrained(make_llama(), path)
        else:
            make_llama().load_adapter(str(path))
    assert pickle_spy == [] and not marker.exists()


def test_peft_reads_no_file_itself_during_a_pica_load(old_adapter, monkeypatch, pickle_spy):
    """The tensors validated before injection are the ones peft loads: its own readers are never reached."""
    path, _, logits = old_adapter

    def refuse(*args, **kwargs):
        raise AssertionError("peft read the adapter file itself")

    monkeypatch.setattr(peft.utils.save_and_load, "safe_load_file", refuse)
    monkeypatch.setattr(peft.utils.save_and_load, "torch_load", refuse)
    loaded = PeftModel.from_pretrained(make_llama(), path)
    assert torch.equal(model_output(loaded, example_inputs("llama")), logits)
    assert pickle_spy == []


def test_no_pickle_module_is_used_by_a_pica_load(old_adapter, monkeypatch):
    path, _, _ = old_adapter

    def refuse(*args, **kwargs):
        raise AssertionError("pickle used on a PiCa load path")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    PeftModel.from_pretrained(make_llama(), path)


def test_install_is_idempotent_and_uninstall_restores_originals():
    wrapped = (PeftModel.save_pretrained, PeftModel.load_adapter, PeftAdapterMixin.load_adapter,
               peft.peft_model.load_peft_weights, PeftModel.__dict__["from_pretrained"].__func__)
    assert integration.is_installed()
    integration.install()
    again = (PeftModel.save_pretrained, PeftModel.load_adapter, PeftAdapterMixin.load_adapter,
             peft.peft_model.load_peft_weights, PeftModel.__dict__["from_pretrained"].__func__)
    assert again == wrapped
    originals = [getattr(w, "__pica_original__") for w in wrapped]
    assert not any(hasattr(o, "__pica_original__") for o in originals)
    integration.uninstall()
    try:
        assert not integration.is_installed()
        assert PeftModel.save_pretrained is originals[0] and peft.peft_model.load_peft_weights is originals[3]
    finally:
        integration.install()
    assert integration.is_installed()


def test_other_peft_methods_take_peft_own_paths(tmp_path, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("PiCa machinery used for a LoRA adapter")

    lora = get_peft_model(make_llama(), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    expected = model_output(lora, example_inputs("llama"))
    monkeypatch.setattr(integration, "atomic_directory_update", forbidden)
    monkeypatch.setattr(loading, "read_adapter", forbidden)
    lora.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_llama(), tmp_path)
    assert torch.equal(model_output(loaded, example_inputs("llama")), expected)
    # peft's own pickle route is untouched for other methods: a LoRA .bin still loads
    torch.save(peft.utils.get_peft_model_state_dict(lora), tmp_path / "adapter_model.bin")
    os.remove(tmp_path / "adapter_model.safetensors")
    loaded = PeftModel.from_pretrained(make_llama(), tmp_path)
    assert torch.equal(model_output(loaded, example_inputs("llama")), expected)


def test_pica_is_always_saved_as_safetensors(tmp_path, caplog):
    model = _adapter(seed=1)
    model.save_pretrained(tmp_path, safe_serialization=False)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert "safetensors only" in caplog.text


def test_config_given_in_code_still_requires_complete_safetensors(old_adapter):
    path, _, logits = old_adapter
    config = PiCaConfig.from_pretrained(str(path))
    loaded = PeftModel.from_pretrained(make_llama(), path, config=config)
    assert torch.equal(model_output(loaded, example_inputs("llama")), logits)
    (path / "adapter_model.safetensors").write_bytes(b"\0" * 16)
    base = make_llama()
    with pytest.raises(AdapterFileError, match="adapter_model.safetensors is not a valid safetensors file"):
        PeftModel.from_pretrained(base, path, config=PiCaConfig.from_pretrained(str(path)))
    assert not hasattr(base, "peft_config")
