"""Load what a run saved (an adapter of any peft method, or a full model) for ``pica eval``/``export``."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

from peft import PeftModel

from .models import load_base_model

logger = logging.getLogger(__name__)

__all__ = ["find_saved", "load_saved"]


def find_saved(path: str | Path) -> tuple[Path, str, dict[str, Any]]:
    """Resolve ``path`` (a run directory ``<out>/<method>/seed<k>``, or its ``adapter``/``model``
    subdirectory, or any peft adapter / transformers model directory).

    Returns:
        ``(directory, "adapter" | "model", run_info)``; ``run_info`` is the run's ``run.json`` (task,
        task_options, model, ...) or ``{}`` if there is none.

    Raises:
        FileNotFoundError: naming the path, if it holds no adapter or model.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"adapter/model directory not found: {path}")
    for candidate in (path / "adapter", path / "model", path):
        if (candidate / "adapter_config.json").is_file():
            found, kind = candidate, "adapter"
            break
        if (candidate / "config.json").is_file():
            found, kind = candidate, "model"
            break
    else:
        raise FileNotFoundError(f"{path} holds neither a peft adapter (adapter_config.json) nor a model (config.json)")
    info: dict[str, Any] = {}
    for run_json in (found / "run.json", found.parent / "run.json"):
        if run_json.is_file():
            info = json.loads(run_json.read_text(encoding="utf-8"))
            break
    return found, kind, info


def load_saved(directory: Path, kind: str, task_kind: str, *, model: Optional[str], gguf_file: Optional[str],
               dtype: str, options: dict[str, Any], pad_token_id: Optional[int]):
    """The trained model: base ``model`` + the adapter in ``directory``, or the saved full model."""
    common = dict(dtype=dtype, num_labels=options.get("num_labels"), problem=options.get("problem"),
                  pad_token_id=pad_token_id)
    if kind == "model":
        return load_base_model(str(directory), task_kind, **common)
    if model is None:
        adapter_config = json.loads((directory / "adapter_config.json").read_text(encoding="utf-8"))
        model = adapter_config.get("base_model_name_or_path")
        if not model:
            raise ValueError(f"{directory}: no base model recorded; pass --model")
    base = load_base_model(model, task_kind, gguf_file=gguf_file, **common)
    return PeftModel.from_pretrained(base, str(directory))
