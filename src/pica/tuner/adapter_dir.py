"""Where an adapter directory is, and whether it holds a valid PiCa config and a complete weights file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from peft.config import PeftConfig
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from peft.utils.constants import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME

from ..io import AdapterFileError, check_safetensors_file, finish_interrupted_save, read_json_object
from .config import PiCaConfig
from .peft_type import PICA_PEFT_TYPE

__all__ = ["local_path", "pica_adapter", "validate_adapter_directory"]


def local_path(model_id: str | os.PathLike, subfolder: str | None) -> Path | None:
    """The local adapter directory meant by ``model_id``, or None for a Hub repository id."""
    looks_local = isinstance(model_id, os.PathLike) or os.path.isabs(model_id) or str(model_id).startswith((".", "~"))
    path = Path(os.path.expanduser(str(model_id)))
    if not (looks_local or path.exists()):
        return None
    if not path.is_dir():
        raise AdapterFileError(f"adapter directory {path} does not exist" if not path.exists() else
                               f"{path} is a file; give the adapter directory that holds {CONFIG_NAME}")
    return path / subfolder if subfolder else path


def validate_adapter_directory(path: str | os.PathLike) -> PiCaConfig | None:
    """Check a local adapter directory's config and weights file; its ``PiCaConfig`` if it holds a
    PiCa adapter, None if it holds another peft method's.

    Non-PiCa adapters are only checked for a readable JSON config with a known ``peft_type``.

    Raises:
        AdapterFileError: missing directory/config/weights, config not JSON or not a valid
            ``PiCaConfig`` (naming the field), truncated/empty/corrupt safetensors.
    """
    path = Path(path)
    if not path.is_dir():
        raise AdapterFileError(f"adapter directory {path} does not exist")
    finish_interrupted_save(path)
    config_file = path / CONFIG_NAME
    peft_type = read_json_object(config_file).get("peft_type")
    if peft_type is None:
        raise AdapterFileError(f"{config_file}: field 'peft_type' is missing")
    known = sorted(str(getattr(t, "value", t)) for t in PEFT_TYPE_TO_CONFIG_MAPPING)
    if not isinstance(peft_type, str) or peft_type not in known:
        raise AdapterFileError(f"{config_file}: field 'peft_type' is {peft_type!r}, not a known PEFT method "
                               f"(PiCa adapters have {PICA_PEFT_TYPE.value!r})")
    if peft_type != PICA_PEFT_TYPE.value:
        return None
    try:
        config = PiCaConfig.from_pretrained(str(path))
    except (ValueError, TypeError) as error:
        raise AdapterFileError(f"{config_file}: {error}") from error
    check_safetensors_file(path / SAFETENSORS_WEIGHTS_NAME)
    return config


def pica_adapter(values: dict[str, Any]) -> tuple[Path, Any] | None:
    """(local directory, config) if the call loads a PiCa adapter, else None (Hub files are downloaded)."""
    model_id, subfolder, config = values["model_id"], values.get("subfolder"), values.get("config")
    path = local_path(model_id, subfolder)
    if config is not None and not isinstance(config, PiCaConfig):
        file = path / CONFIG_NAME if path is not None else None
        if file is not None and file.is_file() and read_json_object(file).get("peft_type") == PICA_PEFT_TYPE.value:
            raise AdapterFileError(f"{file}: a PiCa adapter, but config is a {type(config).__name__}: peft would load "
                                   "its tensors as that method's (and drop them); pass no config or a PiCaConfig")
        return None
    if path is None:  # a Hub id: peft's own resolution, then the same checks on the downloaded files
        hub = {k: values[k] for k in ("revision", "cache_dir", "token", "local_files_only") if values.get(k) is not None}
        try:
            if config is None and PeftConfig._get_peft_type(str(model_id), subfolder=subfolder, **hub) != PICA_PEFT_TYPE.value:
                return None
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(str(model_id), SAFETENSORS_WEIGHTS_NAME, subfolder=subfolder, **hub)).parent
        except Exception:  # noqa: BLE001  (not reachable or not PiCa: peft raises its own error just after)
            return None
    config = config if config is not None else validate_adapter_directory(path)
    return None if config is None else (path, config)
