"""Checks of an adapter directory before anything is loaded from it (errors name the file and field)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from peft.config import PeftConfig
from peft.utils.constants import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME

from ..io import AdapterFileError, check_safetensors_file, read_json_object
from .registration import PICA_PEFT_TYPE

__all__ = ["is_pica_adapter", "local_adapter_path", "validate_adapter_directory"]


def local_adapter_path(model_id: str | os.PathLike, subfolder: str | None) -> Path | None:
    """The local adapter directory meant by ``model_id``, or None for a Hub repository id."""
    looks_local = isinstance(model_id, os.PathLike) or os.path.isabs(model_id) or str(model_id).startswith((".", "~"))
    path = Path(os.path.expanduser(str(model_id)))
    if not (looks_local or path.exists()):
        return None
    if not path.is_dir():
        raise AdapterFileError(f"adapter directory {path} does not exist" if not path.exists() else
                               f"{path} is a file; give the adapter directory that holds {CONFIG_NAME}")
    return path / subfolder if subfolder else path


def validate_adapter_directory(path: str | os.PathLike) -> bool:
    """Check a local adapter directory before anything is loaded; True if it holds a PiCa adapter.

    Non-PiCa adapters are only checked for a readable JSON config with a known ``peft_type`` (peft
    would fail on those too, with a less precise message).

    Raises:
        AdapterFileError: missing directory/config/weights, config not JSON or not a valid
            ``PiCaConfig`` (naming the field), truncated/empty/corrupt safetensors.
    """
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    from .config import PiCaConfig

    path = Path(path)
    if not path.is_dir():
        raise AdapterFileError(f"adapter directory {path} does not exist")
    config_file = path / CONFIG_NAME
    values = read_json_object(config_file)
    peft_type = values.get("peft_type")
    if peft_type is None:
        raise AdapterFileError(f"{config_file}: field 'peft_type' is missing")
    known = sorted(str(getattr(t, "value", t)) for t in PEFT_TYPE_TO_CONFIG_MAPPING)
    if not isinstance(peft_type, str) or peft_type not in known:
        raise AdapterFileError(f"{config_file}: field 'peft_type' is {peft_type!r}, not a known PEFT method "
                               f"(PiCa adapters have {PICA_PEFT_TYPE.value!r})")
    if peft_type != PICA_PEFT_TYPE.value:
        return False
    try:
        PiCaConfig.from_pretrained(str(path))
    except (ValueError, TypeError) as error:
        raise AdapterFileError(f"{config_file}: {error}") from error
    check_safetensors_file(path / SAFETENSORS_WEIGHTS_NAME)
    return True


def is_pica_adapter(model_id: str | os.PathLike, subfolder: str | None, hub_kwargs: dict[str, Any]) -> bool:
    """Validate a local adapter (see :func:`validate_adapter_directory`); ask peft for a Hub one."""
    path = local_adapter_path(model_id, subfolder)
    if path is not None:
        return validate_adapter_directory(path)
    try:
        return PeftConfig._get_peft_type(str(model_id), subfolder=subfolder, **hub_kwargs) == PICA_PEFT_TYPE.value
    except Exception:  # noqa: BLE001  (peft raises its own error for this case just after)
        return False
