"""Load what a run saved (an adapter of any peft method, or a full model) for ``pica eval``/``export``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

from peft import PeftModel

from ..io import AdapterFileError, read_json_object
from .config import RecipeConfig, RecipeError
from .models import load_base_model

logger = logging.getLogger(__name__)

__all__ = ["adapter_config", "find_saved", "load_saved", "read_run_info", "saved_head_size"]

_RUN_TYPES: dict[str, tuple[type, ...]] = {  # run.json key → accepted JSON types (None is always accepted)
    "task": (str,), "task_options": (dict,), "model": (str,), "gguf_file": (str,), "dtype": (str,),
    "max_length": (int,), "method": (str,), "seed": (int,), "saved": (str,), "head_modules": (list,),
}
_RECIPE_KEYS = ("task", "task_options", "model", "gguf_file", "dtype", "max_length", "quantize")


def read_run_info(path: str | Path) -> dict[str, Any]:
    """Read and check a run's ``run.json`` (what ``pica train`` recorded to rebuild the base model).

    Raises:
        AdapterFileError: not readable JSON, nested too deeply, not an object, or a key with a wrong
            type or value (naming the file and the key).
    """
    info = read_json_object(path)
    for key, types in _RUN_TYPES.items():
        value = info.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, types)):
            raise AdapterFileError(f"{path}: {key} must be a {types[0].__name__}, got {value!r}")
    try:
        RecipeConfig(**{key: info[key] for key in _RECIPE_KEYS if info.get(key) is not None})
    except RecipeError as error:
        raise AdapterFileError(f"{path}: {error}") from None
    return info


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
        AdapterFileError: the run's ``run.json`` is invalid (see :func:`read_run_info`).
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
    """Output size of the saved task head (``classifier``/``score`` weight) of an adapter, if it has one."""
    from safetensors import safe_open

    weights = Path(directory) / "adapter_model.safetensors"
    if not weights.is_file():
        return None
    with safe_open(str(weights), framework="pt") as handle:
        for key in handle.keys():
            parts = key.split(".")
            if parts[-1] == "weight" and {"classifier", "score"} & set(parts):
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
