"""Every place where pica wraps ``peft`` (and transformers' peft integration) behaviour.

peft 0.21.2 has no hooks for these, so a few of its functions are wrapped. Each wrapper acts only
when a PiCa adapter is involved and otherwise calls the original unchanged; :func:`install` is
idempotent (a wrapper remembers the original in ``__pica_original__``) and :func:`uninstall`
restores the originals. If peft changes these functions, this module is the one place to fix.

What is wrapped and why:

* ``PeftModel.save_pretrained``: when a selected adapter is PiCa, peft writes into a staging
  directory next to the target and the files are then moved in with ``os.replace``
  (:func:`pica.io.atomic_directory_update`): an interrupted save leaves the previous adapter whole.
* ``PeftModel.from_pretrained`` / ``PeftModel.load_adapter`` / transformers'
  ``PeftAdapterMixin.load_adapter``: for a local PiCa adapter the directory, ``adapter_config.json``
  (JSON, known ``peft_type``, valid ``PiCaConfig``) and ``adapter_model.safetensors`` (present,
  non-empty, complete) are checked *before* any module is replaced; errors name the file and field.
  Any error later in the load removes the layers injected for the adapter, so the base model is
  left as it was (peft injects layers before it reads the weights).
* ``peft.peft_model.load_peft_weights``: during a PiCa load, every stored floating tensor must be
  finite (the error names the key and file).
* ``peft.utils.save_and_load.torch_load``: during a PiCa load it refuses to run, so no pickle is
  ever read on a PiCa load path, even if a file disappears between the checks and the read.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import peft.peft_model
import peft.utils.save_and_load
import torch
from peft import PeftModel
from peft.utils.constants import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME

from ..io import AdapterFileError, atomic_directory_update, check_safetensors_file
from .adapter_files import is_pica_adapter, local_adapter_path, validate_adapter_directory

logger = logging.getLogger(__name__)

__all__ = ["install", "is_installed", "pica_load", "projectors_from_file", "uninstall", "validate_adapter_directory"]

_ORIGINAL = "__pica_original__"
_LOADING: contextvars.ContextVar[str | None] = contextvars.ContextVar("pica_loading", default=None)
_CHECKED_LOAD: contextvars.ContextVar[bool] = contextvars.ContextVar("pica_checked_load", default=False)


def projectors_from_file() -> bool:
    """True inside a peft load whose tensors pass :func:`serialization.check_for_load`: a config
    that stores ``P`` then gets it from the file, so injection need not compute it."""
    return _CHECKED_LOAD.get()


@contextlib.contextmanager
def pica_load(model_id: str | os.PathLike, checked: bool = False) -> Iterator[None]:
    """Mark the current thread as loading a PiCa adapter (activates the pickle guard).

    Args:
        model_id: adapter location, for messages.
        checked: the load goes through peft's ``set_peft_model_state_dict`` (and so through
            :func:`serialization.check_for_load`); transformers' own loader does not.
    """
    tokens = _LOADING.set(str(model_id)), _CHECKED_LOAD.set(checked)
    try:
        yield
    finally:
        _CHECKED_LOAD.reset(tokens[1])
        _LOADING.reset(tokens[0])


@contextlib.contextmanager
def _rollback_on_error(model: torch.nn.Module, adapter_name: str, remove: bool = True) -> Iterator[None]:
    """On an exception, remove the adapter's injected layers and restore ``requires_grad`` flags.

    peft freezes the base parameters when it injects an adapter, so a failed load must unfreeze them.
    """
    from .serialization import remove_adapter_layers

    trainable = {id(p): p.requires_grad for p in model.parameters()}
    try:
        yield
    except BaseException:
        try:
            if remove:
                remove_adapter_layers(model, adapter_name)
            for parameter in model.parameters():
                if id(parameter) in trainable:
                    parameter.requires_grad_(trainable[id(parameter)])
        except Exception:  # noqa: BLE001  (never hide the original error)
            logger.exception("PiCa: could not undo the failed load of adapter %r", adapter_name)
        raise


@contextlib.contextmanager
def _naming(model_id: str | os.PathLike) -> Iterator[None]:
    """Prefix the adapter location to a ``ValueError`` raised while loading (e.g. by the tensor checks)."""
    try:
        yield
    except AdapterFileError:
        raise
    except ValueError as error:
        raise AdapterFileError(f"{model_id}: {error}") from error


# ---------------------------------------------------------------------------------------------- wrappers


def _arguments(original: Callable, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """The call's arguments by name (defaults filled in), to read options however they were passed."""
    bound = inspect.signature(original).bind_partial(*args, **kwargs)
    bound.apply_defaults()
    values = dict(bound.arguments)
    values.update(values.pop("kwargs", None) or {})
    return values


def _hub_kwargs(values: dict[str, Any]) -> dict[str, Any]:
    return {k: values[k] for k in ("revision", "cache_dir", "token", "local_files_only") if values.get(k) is not None}


def _save_pretrained(original: Callable, self: PeftModel, *args: Any, **kwargs: Any) -> None:
    from .config import PiCaConfig

    values = _arguments(original, self, *args, **kwargs)
    values.pop("self")
    save_directory = values["save_directory"]
    selected = values.get("selected_adapters") or list(self.peft_config)
    pica = any(isinstance(self.peft_config.get(name), PiCaConfig) for name in selected)
    if not pica or not values.get("is_main_process", True) or os.path.isfile(save_directory):
        return original(self, *args, **kwargs)
    if not values.get("safe_serialization", True):
        logger.warning("PiCa adapters are saved as safetensors only (no pickle); ignoring safe_serialization=False")
        values["safe_serialization"] = True
    with atomic_directory_update(save_directory, seed_files=("README.md",), last=(CONFIG_NAME,)) as staging:
        return original(self, **{**values, "save_directory": str(staging)})


def _checked_load(values: dict[str, Any], model_id: Any) -> bool:
    """True (after checking the files) if ``model_id`` holds a PiCa adapter."""
    from .config import PiCaConfig

    config = values.get("config")
    if isinstance(config, PiCaConfig):  # config given in code: only the weights come from disk
        path = local_adapter_path(model_id, values.get("subfolder"))
        if path is not None:
            check_safetensors_file(path / SAFETENSORS_WEIGHTS_NAME)
        return True
    if config is not None:
        return False
    return is_pica_adapter(model_id, values.get("subfolder"), _hub_kwargs(values))


def _from_pretrained(original: Callable, cls: type, *args: Any, **kwargs: Any) -> PeftModel:
    values = _arguments(original, cls, *args, **kwargs)
    model, model_id, adapter_name = values["model"], values["model_id"], values["adapter_name"]
    if not _checked_load(values, model_id):
        return original(cls, *args, **kwargs)
    with pica_load(model_id, checked=True), _rollback_on_error(model, adapter_name), _naming(model_id):
        return original(cls, *args, **kwargs)


def _load_adapter(original: Callable, self: PeftModel, *args: Any, **kwargs: Any) -> Any:
    if _LOADING.get() is not None:  # inside from_pretrained: already checked
        return original(self, *args, **kwargs)
    values = _arguments(original, self, *args, **kwargs)
    model_id, adapter_name = values["model_id"], values["adapter_name"]
    if not _checked_load(values, model_id):
        return original(self, *args, **kwargs)
    remove = adapter_name not in self.peft_config
    with pica_load(model_id, checked=True), _rollback_on_error(self, adapter_name, remove=remove), _naming(model_id):
        return original(self, *args, **kwargs)


def _transformers_load_adapter(original: Callable, self: torch.nn.Module, peft_model_id: str | None = None,
                               *args: Any, **kwargs: Any) -> Any:
    if peft_model_id is None or kwargs.get("adapter_state_dict") is not None:
        return original(self, peft_model_id, *args, **kwargs)
    subfolder = (kwargs.get("adapter_kwargs") or {}).get("subfolder")
    if not is_pica_adapter(peft_model_id, subfolder, {}):
        return original(self, peft_model_id, *args, **kwargs)
    with pica_load(peft_model_id):
        return original(self, peft_model_id, *args, **kwargs)


def _load_peft_weights(original: Callable, model_id: str, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
    if _LOADING.get() is None:
        return original(model_id, *args, **kwargs)
    subfolder = kwargs.get("subfolder")
    where = os.path.join(str(model_id), subfolder) if subfolder else str(model_id)
    try:
        tensors = original(model_id, *args, **kwargs)
    except Exception as error:
        raise AdapterFileError(f"cannot read the PiCa adapter weights in {where}: {error}") from error
    bad = [key for key, value in tensors.items()
           if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all()]
    if bad:
        raise AdapterFileError(f"{os.path.join(where, SAFETENSORS_WEIGHTS_NAME)}: non-finite values in {len(bad)} "
                               f"tensor(s): {', '.join(sorted(bad)[:6])}")
    return tensors


def _torch_load(original: Callable, *args: Any, **kwargs: Any) -> Any:
    loading = _LOADING.get()
    if loading is not None:
        raise AdapterFileError(f"refusing to unpickle a file while loading PiCa adapter {loading}: PiCa adapters "
                               f"are read from {SAFETENSORS_WEIGHTS_NAME} only (no pickle)")
    return original(*args, **kwargs)


# ---------------------------------------------------------------------------------------------- install


def _targets() -> list[tuple[Any, str, Callable, bool]]:
    """(owner, attribute, wrapper body, is_classmethod) for every wrapped callable."""
    from transformers.integrations.peft import PeftAdapterMixin

    return [
        (PeftModel, "save_pretrained", _save_pretrained, False),
        (PeftModel, "from_pretrained", _from_pretrained, True),
        (PeftModel, "load_adapter", _load_adapter, False),
        (PeftAdapterMixin, "load_adapter", _transformers_load_adapter, False),
        (peft.peft_model, "load_peft_weights", _load_peft_weights, False),
        (peft.utils.save_and_load, "torch_load", _torch_load, False),
    ]


def _current(owner: Any, attribute: str, is_classmethod: bool) -> Callable:
    raw = vars(owner)[attribute] if isinstance(owner, type) else getattr(owner, attribute)
    return raw.__func__ if is_classmethod else raw


def is_installed() -> bool:
    """True if every wrapper is in place."""
    return all(hasattr(_current(owner, name, cm), _ORIGINAL) for owner, name, _, cm in _targets())


def install() -> None:
    """Install the wrappers (idempotent: a wrapped callable is never wrapped twice)."""
    for owner, attribute, body, is_classmethod in _targets():
        original = _current(owner, attribute, is_classmethod)
        if hasattr(original, _ORIGINAL):
            continue
        wrapper = _wrap(body, original)
        setattr(owner, attribute, classmethod(wrapper) if is_classmethod else wrapper)


def _wrap(body: Callable, original: Callable) -> Callable:
    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return body(original, *args, **kwargs)

    setattr(wrapper, _ORIGINAL, original)
    return wrapper


def uninstall() -> None:
    """Put the original peft/transformers callables back."""
    for owner, attribute, _, is_classmethod in _targets():
        current = _current(owner, attribute, is_classmethod)
        original = getattr(current, _ORIGINAL, None)
        if original is not None:
            setattr(owner, attribute, classmethod(original) if is_classmethod else original)
