"""Concurrent saves into one adapter directory take turns (issue 16, item 11): every load sees one
save's config and weights, never a mix."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch
from peft import PeftModel

from tests.conftest import example_inputs, make_llama, model_output

ROOT = Path(__file__).resolve().parents[2]
ROUNDS = 12

WRITER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    import peft, pica, torch
    from tests.conftest import example_inputs, make_llama, model_output, randomize_updates

    path, rank, go = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    model = peft.get_peft_model(make_llama(), pica.PiCaConfig(rank=rank))
    randomize_updates(model, seed=rank)
    torch.save(model_output(model, example_inputs("llama")), path.parent / f"logits{rank}.pt")
    (path.parent / f"ready{rank}").touch()
    real_replace = os.replace

    def slow_replace(source, destination):  # widen the window between two files of one save
        real_replace(source, destination)
        time.sleep(0.02)

    os.replace = slow_replace
    while not go.exists():
        time.sleep(0.01)
    for _ in range(ROUNDS):
        model.save_pretrained(path)
    """
).replace("ROUNDS", str(ROUNDS))


def test_concurrent_saves_and_loads_never_mix_two_saves(tmp_path, monkeypatch):
    from pica.tuner import loading

    real_read = loading.read_adapter

    def slow_read(*args, **kwargs):  # widen the window between reading the config and the weights
        time.sleep(0.05)
        return real_read(*args, **kwargs)

    monkeypatch.setattr(loading, "read_adapter", slow_read)
    path, go = tmp_path / "adapter", tmp_path / "go"
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(rank), str(go)], cwd=ROOT,
                                stderr=subprocess.PIPE, text=True) for rank in (4, 6)]
    deadline = time.monotonic() + 240
    while not all((tmp_path / f"ready{rank}").exists() for rank in (4, 6)):
        assert time.monotonic() < deadline and all(w.poll() is None for w in writers), \
            [w.stderr.read()[-2000:] for w in writers if w.poll() is not None]
        time.sleep(0.05)
    expected = {rank: torch.load(tmp_path / f"logits{rank}.pt") for rank in (4, 6)}
    go.touch()
    loads = 0
    while any(w.poll() is None for w in writers) or loads == 0:
        if (path / "adapter_config.json").exists():
            loaded = PeftModel.from_pretrained(make_llama(), path)  # must never fail on a mixed directory
            rank = loaded.peft_config["default"].rank
            assert torch.equal(model_output(loaded, example_inputs("llama")), expected[rank])
            loads += 1
    for writer in writers:
        assert writer.wait(timeout=60) == 0, writer.stderr.read()[-2000:]
    loaded = PeftModel.from_pretrained(make_llama(), path)
    assert torch.equal(model_output(loaded, example_inputs("llama")), expected[loaded.peft_config["default"].rank])
    assert sorted(p.name for p in path.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert loads >= 1
