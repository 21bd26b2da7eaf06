"""Print the error message of every bad-adapter case (one JSON object), for the docs and issue notes.

Usage: ``PYTHONPATH=src python -m benchmarks.bad_inputs`` from the repository root. The cases are the
table in ``tests/tuner/test_bad_adapters.py`` plus the tensor-level ones of ``test_serialization.py``.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from pica import PiCaConfig
from tests.conftest import make_llama, randomize_updates
from tests.tuner.test_bad_adapters import CASES, CONFIG, WEIGHTS


def _edit(path: Path, edit) -> None:
    tensors = load_file(path / WEIGHTS)
    edit(tensors)
    save_file(tensors, path / WEIGHTS)


def _first(tensors: dict, part: str) -> str:
    return next(key for key in sorted(tensors) if part in key)


TENSOR_CASES = {  # the cases of tests/tuner/test_serialization.py::test_bad_adapters_raise_and_leave_base_untouched
    "other_base_same_shapes": (None, lambda: make_llama(seed=7)),
    "other_base_other_shapes": (None, lambda: make_llama(hidden_size=48)),
    "missing_m": (lambda p: _edit(p, lambda t: [t.pop(k) for k in [k for k in t if k == "base_model.pica_M.model/layers/*/self_attn/q_proj"]]), make_llama),
    "wrong_shape_p": (lambda p: _edit(p, lambda t: t.__setitem__(_first(t, "pica_P"), torch.zeros(3, 32))), make_llama),
    "nan_m": (lambda p: _edit(p, lambda t: t[_first(t, "base_model.pica_M.")].fill_(float("nan"))), make_llama),
    "missing_fingerprint": (lambda p: _edit(p, lambda t: t.pop(_first(t, "pica_fingerprint"))), make_llama),
}


def main() -> None:
    root = Path(tempfile.mkdtemp())
    good = root / "good"
    model = get_peft_model(make_llama(), PiCaConfig(rank=4))
    randomize_updates(model)
    model.save_pretrained(good)
    cases = {name: (edit, make_llama) for name, (edit, _) in CASES.items()} | TENSOR_CASES
    messages = {}
    for name, (edit, base) in cases.items():
        path = root / ("does-not-exist" if name == "missing_directory" else name)
        if name != "missing_directory":
            os.makedirs(path)
            for file in (WEIGHTS, CONFIG):
                shutil.copy(good / file, path / file)
            if edit is not None:
                edit(path)
        try:
            PeftModel.from_pretrained(base(), path)
            messages[name] = "NO ERROR"
        except Exception as error:  # noqa: BLE001
            messages[name] = f"{type(error).__name__}: {str(error).replace(str(root), '<tmp>')}"
    shutil.rmtree(root)
    print(json.dumps({"command": "PYTHONPATH=src python -m benchmarks.bad_inputs", "python": sys.version.split()[0],
                      "torch": torch.__version__, "machine": platform.platform(), "cases": len(messages),
                      "messages": messages}, indent=1))


if __name__ == "__main__":
    main()
