"""How much of pica a reader follows: the distinct pica functions (and their files) that run during one
``PeftModel.from_pretrained`` of a PiCa adapter, one ``load_adapter``, one ``get_peft_model`` and one
training forward of a PiCa layer (issue 26's "load walk"). Counted with ``sys.setprofile`` on Python calls
whose code lives under ``src/pica``; comprehensions and lambdas are not counted.

    python benchmarks/load_walk.py [--out benchmarks/results/load_walk.json]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import emit, machine_info  # noqa: E402
from peft import PeftModel, get_peft_model  # noqa: E402

from pica import PiCaConfig  # noqa: E402
from tests.conftest import make_llama, randomize_updates  # noqa: E402

SOURCE = ROOT / "src" / "pica"


def walk(action: Callable[[], object]) -> dict:
    """The pica functions that ``action`` runs: count, files, and each ``file:function``."""
    seen: set[tuple[str, str]] = set()

    def profile(frame, event, arg) -> None:  # noqa: ANN001
        if event == "call":
            code = frame.f_code
            if code.co_filename.startswith(str(SOURCE)) and not code.co_name.startswith("<"):
                seen.add((str(Path(code.co_filename).relative_to(SOURCE)), code.co_qualname))

    sys.setprofile(profile)
    try:
        action()
    finally:
        sys.setprofile(None)
    files = sorted({file for file, _ in seen})
    return {"functions": len(seen), "files": len(files), "file_list": files,
            "function_list": sorted(f"{file}:{name}" for file, name in seen)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        first, second = Path(folder) / "first", Path(folder) / "second"
        created = {}
        result = {"get_peft_model": walk(lambda: created.setdefault("m", get_peft_model(make_llama(), PiCaConfig(rank=4))))}
        randomize_updates(created["m"], seed=1)
        created["m"].save_pretrained(first)
        created["m"].save_pretrained(second)
        loaded = {}
        result["from_pretrained"] = walk(lambda: loaded.setdefault("m", PeftModel.from_pretrained(make_llama(), first)))
        result["load_adapter"] = walk(lambda: loaded["m"].load_adapter(second, adapter_name="second"))
        model = loaded["m"]
        model.train()
        layer = model.base_model.model.model.layers[0].self_attn.q_proj
        x = torch.randn(2, 5, layer.in_features)
        result["training_forward_of_one_layer"] = walk(lambda: layer(x))
    emit({"machine": machine_info(), "walks": result}, args.out)


if __name__ == "__main__":
    main()
