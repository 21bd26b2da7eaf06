"""Register PiCa with peft as soon as peft is imported, without importing peft ourselves (pure Python).

``import pica`` must register the method (the README's ``import pica`` then
``PeftModel.from_pretrained``), but importing a maths leaf (``pica.projector``, ...) must not pull in
peft or transformers. So ``pica/__init__.py`` registers at once if peft is already imported, and
otherwise installs this finder: the first ``import peft`` runs peft's own loader, then imports
:mod:`pica.tuner` (which registers). The finder removes itself on that first import.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from importlib.machinery import ModuleSpec
from types import ModuleType

__all__ = ["register_when_peft_is_imported"]


class _AfterPeft(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the spec other finders give for ``peft`` so that pica's tuner is
    imported right after peft's module body has run."""

    def find_spec(self, fullname: str, path: object, target: ModuleType | None = None) -> ModuleSpec | None:
        if fullname != "peft":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("peft")
        if spec is None or spec.loader is None:
            return spec
        run_peft = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run_peft(module)
            importlib.import_module("pica.tuner")  # registers PiCa, installs the load/save integration

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]  (this spec's own loader)
        return spec


def register_when_peft_is_imported() -> None:
    """Import :mod:`pica.tuner` now if peft is already imported, else right after peft is."""
    if sys.modules.get("peft") is not None:
        importlib.import_module("pica.tuner")
    elif "peft" not in sys.modules and not any(isinstance(f, _AfterPeft) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterPeft())
