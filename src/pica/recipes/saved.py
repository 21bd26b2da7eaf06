"""Load what a run saved (an adapter of any peft method, or a full model) for ``pica eval``/``export``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

from peft import PeftModel

from ..io import read_json_object
from .heads import HEAD_NAMES
from .models import load_base_model
from .run_records import read_run_info

logger = logging.getLogger(__name__)

__all__ = ["adapter_config", "find_saved", "load_saved", "saved_head_size"]


def adapter_config(directory: str | Path) -> dict[str, Any]:
    """The ``adapter_config.json`` of an adapter directory, as a dict.

    Raises:
        AdapterFileError: missing, not JSON, nested too deeply or not an object (naming the file).
    """
    return read_json_object(Path(directory) / "adapter_config.json")


def find_saved(path: str | Path) -> tuple[Path, str, dict[str, Any]]:
    """Resolve ``path`` (a run directory ``<out>/<method>/seed<k>``, or its ``adapter``/``model``
    subdirectory, or any peft adapter / transformers model directory).

    Returns:
        ``(directory, "adapter" | "model", run_info)``; ``run_info`` is the run's ``run.json`` (task,
        task_options, model, ...) or ``{}`` if there is none.

    Raises:
        FileNotFoundError: naming the path, if it holds no adapter or model.
        AdapterFileError: the run's ``run.json`` is invalid (see :func:`pica.recipes.run_records.read_run_info`).
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
            info = read_run_info(run_json)
            break
    return found, kind, info


def saved_head_size(directory: str | Path) -> Optional[int]:
    """Output size of the saved task head (a :data:`pica.recipes.heads.HEAD_NAMES` weight) of an adapter, if it has one."""
    from safetensors import safe_open

    weights = Path(directory) / "adapter_model.safetensors"
    if not weights.is_file():
        return None
    with safe_open(str(weights), framework="pt") as handle:
        for key in handle.keys():
            parts = key.split(".")
            if parts[-1] == "weight" and set(HEAD_NAMES) & set(parts):
                return handle.get_slice(key).get_shape()[0]
    return None


def load_saved(directory: Path, kind: str, task_kind: str, *, model: Optional[str], gguf_file: Optional[str],
               dtype: str, options: dict[str, Any], pad_token_id: Optional[int], quantize: Optional[str] = None,
               modality: str = "text"):
    """The trained model: base ``model`` (quantised by bitsandbytes if ``quantize``, as it was trained) + the
    adapter in ``directory``, or the saved full model.

    Raises:
        ValueError: ``quantize`` for a saved full model (only adapters train on quantised bases).
    """
    common = dict(dtype=dtype, num_labels=options.get("num_labels"), problem=options.get("problem"),
                  pad_token_id=pad_token_id, modality=modality)
    if kind == "model":
        if quantize is not None:
            raise ValueError(f"{directory} is a full model; quantize={quantize!r} applies to adapter runs only")
        return load_base_model(str(directory), task_kind, **common)
    common["quantize"] = quantize
    if model is None:
        model = adapter_config(directory).get("base_model_name_or_path")
        if not model:
            raise ValueError(f"{directory}: no base model recorded; pass --model")
    base = load_base_model(model, task_kind, gguf_file=gguf_file, **common)
    return PeftModel.from_pretrained(base, str(directory))
