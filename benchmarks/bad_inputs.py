"""Bad adapter inputs tried against every loader: how many are refused with the model unchanged.

Usage: ``PYTHONPATH=src python -m benchmarks.bad_inputs [--out benchmarks/results/bad_inputs.json]`` from the
repository root. Prints one JSON object (and writes it to ``--out`` if given).

The cases are the tables of the test suite:

* ``tests/tuner/test_bad_adapters.py::CASES`` (broken directories, configs and files), each through
  ``PeftModel.from_pretrained``, ``PeftModel.load_adapter`` (as a second adapter of a PeftModel),
  transformers' ``base.load_adapter`` and, where the file's tensors can be read and differ from the
  good adapter's, ``set_peft_model_state_dict``;
* the tensor-level cases of ``tests/tuner/test_serialization.py::test_bad_adapters_raise_and_leave_base_untouched``
  through the same loaders;
* ``tests/tuner/test_adversarial_loads.py::CASES``, each through the loader its row names (including
  ``tuner_method`` rows: merges and adds).

A case counts as *refused, model unchanged* when the call raised the expected error type (a
``ValueError`` for the first two tables) and afterwards the model's logits and every state-dict tensor
are bitwise equal to before, with the same state-dict keys, module types, ``requires_grad`` flags,
``peft_config``, active and merged adapters (``snapshot`` in ``test_adversarial_loads.py``).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import peft
import torch
import transformers
from peft import PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from _common import emit  # benchmarks/ is on sys.path when this file runs as a script
from pica import PiCaConfig
from tests.conftest import make_llama, randomize_updates
from tests.tuner import test_adversarial_loads as adversarial
from tests.tuner.test_bad_adapters import CASES as DIRECTORY_CASES
from tests.tuner.test_bad_adapters import CONFIG, WEIGHTS

COMMAND = "PYTHONPATH=src python -m benchmarks.bad_inputs --out benchmarks/results/bad_inputs.json"
LOADERS = ("from_pretrained", "load_adapter", "set_peft_model_state_dict", "transformers_load_adapter", "tuner_method")
Q_M = "base_model.pica_M.model/layers/*/self_attn/q_proj"


def _edit(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        tensors = load_file(path / WEIGHTS)
        edit(tensors)
        save_file(tensors, path / WEIGHTS)
    return apply


def _first(tensors: dict, part: str) -> str:
    return next(key for key in sorted(tensors) if part in key)


SERIALIZATION_CASES = {  # test_serialization.py::test_bad_adapters_raise_and_leave_base_untouched: (edit, base)
    "other_base_same_shapes": (None, lambda: make_llama(seed=7)),
    "other_base_other_shapes": (None, lambda: make_llama(hidden_size=48)),
    "missing_m": (_edit(lambda t: t.pop(Q_M)), make_llama),
    "wrong_shape_p": (_edit(lambda t: t.__setitem__(_first(t, "pica_P"), torch.zeros(3, 32))), make_llama),
    "nan_m": (_edit(lambda t: t[_first(t, "base_model.pica_M.")].fill_(float("nan"))), make_llama),
    "missing_fingerprint": (_edit(lambda t: t.pop(_first(t, "pica_fingerprint"))), make_llama),
}


def _directory_setups(path: Path, good: Path, base: Callable, differs: bool) -> dict[str, adversarial.Setup]:
    """(model, action) builders of one bad directory, per loader that applies to it."""
    def from_pretrained(root):
        model = base()
        return model, lambda: PeftModel.from_pretrained(model, path)

    def load_adapter(root):  # a first adapter that fits this base, then the bad one as a second
        model = get_peft_model(base(), PiCaConfig(rank=2, target_modules=["q_proj"]), adapter_name="good")
        randomize_updates(model, seed=1)
        return model, lambda: model.load_adapter(path, adapter_name="bad")

    def transformers_load_adapter(root):
        model = base()
        return model, lambda: model.load_adapter(str(path))

    def set_state_dict(root):
        model = get_peft_model(base(), PiCaConfig(rank=4))
        tensors = load_file(path / WEIGHTS)
        return model, lambda: set_peft_model_state_dict(model, tensors)

    setups = {"from_pretrained": from_pretrained, "load_adapter": load_adapter,
              "transformers_load_adapter": transformers_load_adapter}
    if differs:
        setups["set_peft_model_state_dict"] = set_state_dict
    return setups


def _readable_and_different(path: Path, good: Path) -> bool:
    try:
        tensors = load_file(path / WEIGHTS)
    except Exception:  # noqa: BLE001  (missing, truncated or random bytes: no state dict to hand over)
        return False
    reference = load_file(good / WEIGHTS)
    return tensors.keys() != reference.keys() or any(not torch.equal(tensors[k], reference[k]) for k in tensors)


def _record(results: list, root: Path, table: str, name: str, loader: str, setup: adversarial.Setup,
            error_type: type[Exception], kind: str = "llama") -> None:
    case = adversarial.Case(loader, setup, error_type, "", False, kind)
    try:
        outcome = adversarial.run_case(case, root)
    except Exception as error:  # noqa: BLE001  (a setup that fails is reported, not hidden)
        outcome = {"error": None, "changed": [f"setup failed: {type(error).__name__}: {error}"]}
    error = outcome["error"]
    message = "" if error is None else str(error).replace(str(root), "<tmp>")
    refused = isinstance(error, error_type)
    results.append({"table": table, "case": name, "loader": loader, "expected": error_type.__name__,
                    "raised": type(error).__name__ if error is not None else None, "message": message[:400],
                    "refused": refused, "changed": outcome["changed"],
                    "refused_unchanged": refused and not outcome["changed"]})


def run() -> dict[str, Any]:
    root = Path(tempfile.mkdtemp())
    results: list[dict[str, Any]] = []
    try:
        good = root / "good"
        model = get_peft_model(make_llama(), PiCaConfig(rank=4))
        randomize_updates(model, seed=5)
        model.save_pretrained(good)
        directory_cases = {f"test_bad_adapters.{name}": (edit, make_llama) for name, (edit, _) in DIRECTORY_CASES.items()}
        directory_cases |= {f"test_serialization.{name}": case for name, case in SERIALIZATION_CASES.items()}
        for label, (edit, base) in directory_cases.items():
            table, name = label.split(".", 1)
            path = root / ("does-not-exist" if name == "missing_directory" else name)
            if name != "missing_directory":
                os.makedirs(path)
                for file in (WEIGHTS, CONFIG):
                    shutil.copy(good / file, path / file)
                if edit is not None:
                    edit(path)
            differs = name != "missing_directory" and (_readable_and_different(path, good) or base is not make_llama)
            for loader, setup in _directory_setups(path, good, base, differs).items():
                _record(results, root, table, name, loader, setup, ValueError)
        for name, case in sorted(adversarial.CASES.items()):
            case_root = root / "adversarial" / name
            case_root.mkdir(parents=True)
            _record(results, case_root, "test_adversarial_loads", name, case.loader, case.setup, case.error, case.kind)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    per_loader = {loader: {"tried": sum(r["loader"] == loader for r in results),
                           "refused_unchanged": sum(r["loader"] == loader and r["refused_unchanged"] for r in results)}
                  for loader in LOADERS}
    return {
        "command": COMMAND,
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__, "peft": peft.__version__,
                     "transformers": transformers.__version__},
        "machine": platform.platform(),
        "tried": len(results),
        "refused_unchanged": sum(r["refused_unchanged"] for r in results),
        "per_loader": per_loader,
        "not_refused_or_changed": [f"{r['table']}.{r['case']} via {r['loader']}" for r in results if not r["refused_unchanged"]],
        "cases": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    report = run()
    emit(report, args.out)


if __name__ == "__main__":
    main()
