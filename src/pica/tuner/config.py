"""``PiCaConfig``: the PEFT config of PiCa, validated on construction and on load, and PiCa's name in peft
(``PeftType.PICA``, added to peft's str-enum with ``aenum.extend_enum`` once per process)."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import InitVar, dataclass, field
from typing import Any, Literal, Optional, Union

import aenum
from peft.config import PeftConfig
from peft.utils.peft_types import PeftType

from ..default_targets import DEFAULT_TARGET_MODULES
from ..quantization_record import check_record

__all__ = ["DEFAULT_TARGET_MODULES", "PICA_NAME", "PICA_PEFT_TYPE", "PICA_PREFIX", "PiCaConfig"]

PICA_NAME = "pica"
PICA_PREFIX = "pica_"
if not hasattr(PeftType, PICA_NAME.upper()):
    aenum.extend_enum(PeftType, PICA_NAME.upper(), PICA_NAME.upper())
PICA_PEFT_TYPE: PeftType = getattr(PeftType, PICA_NAME.upper())

logger = logging.getLogger(__name__)

_CHOICES = {"projector_dtype": ("float32", "float64"), "subspace": ("top", "random"),
            "projector_storage": ("full", "compact"), "forward_mode": ("auto", "factored")}
_REMOVED_FORWARD_MODES = ("merged", "merged_keep")


@dataclass
class PiCaConfig(PeftConfig):
    """Configuration of a PiCa adapter: ``W0_i + M_g P_i`` on each target, ``P_i (rank×in)`` the frozen top-``rank``
    right singular vectors of ``W0_i (out×in)``, ``M_g (out×rank)`` trainable, zero at start, one per group of
    layers with the same role. Unknown keys are refused (``TypeError``; ``pica.io.AdapterFileError`` from a file).

    Attributes:
        rank: singular directions per layer; ``1 ≤ rank ≤ min(in, out)`` of every target.
        target_modules: names matched exactly or as a dotted-path suffix (list), or a regex full-matched against
            the whole path (str); None: the model type's default (:mod:`pica.default_targets`).
        exclude_modules: same rules; never adapted.
        share_across_layers: one ``M`` per role (layer indices wildcarded) if True, per layer if False.
        layers_to_transform, layers_pattern: only these layer indices, of the layer list with this attribute name.
        modules_to_save: modules trained in full and saved with the adapter. projector_dtype: of P's computation.
        subspace: ``"top"`` (the method) or ``"random"`` (ablation: a random orthonormal ``P`` drawn from
            ``subspace_seed`` and the module name, stored like the top one).
        projector_storage: ``"full"`` (the file holds every ``P``) or ``"compact"`` (a sketch per layer; ``P`` is
            recomputed at load and refused if it misses the sketch). The removed ``"none"`` reads as ``"compact"``
            whose files may lack sketches (``P`` recomputed unchecked, as it was saved), with a warning.
        store_projector: init-only, the pica 0.1.0 name (True = ``"full"``); must agree with ``projector_storage``.
        forward_mode: ``"auto"`` (``x (W0 + M P)ᵀ`` in one product when exact and cheaper, else factored) or
            ``"factored"`` (``base(x) + (x Pᵀ) Mᵀ``). The removed ``"merged"``/``"merged_keep"`` read as ``"auto"``.
        init_weights: True: ``M = 0`` (the method). False: ``M`` ~ N(0, 0.1/sqrt(rank)), for tests only.
        base_quantization: set by PiCa: the quantisation scheme of the base the adapter was created on (None:
            unquantised); ``P`` and fingerprints read weights by it (:mod:`pica.quantization_record`).
    """

    rank: int = field(default=256, metadata={"help": "Number of top right singular directions per layer."})
    target_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Names or a regex."})
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Never adapted."})
    share_across_layers: bool = field(default=True, metadata={"help": "One M per role (True) or per layer."})
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None, metadata={"help": "Layer indices."})
    layers_pattern: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Layer-list name."})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "Trained in full and saved."})
    projector_dtype: Literal["float32", "float64"] = field(default="float32", metadata={"help": "P's precision."})
    subspace: Literal["top", "random"] = field(default="top", metadata={"help": "'top' (PiCa) or 'random'."})
    subspace_seed: int = field(default=0, metadata={"help": "Seed of the random subspace (with the module name)."})
    store_projector: InitVar[Optional[bool]] = None
    projector_storage: Literal["full", "compact"] = field(default="full", metadata={"help": "What holds P."})
    forward_mode: Literal["auto", "factored"] = field(default="auto", metadata={"help": "auto | factored."})
    init_weights: bool = field(default=True, metadata={"help": "True: M = 0. False: random M, for tests only."})
    base_quantization: Optional[dict] = field(default=None, metadata={"help": "Set by PiCa: the base's scheme."})

    def __new__(cls, *args: Any, **kwargs: Any) -> "PiCaConfig":
        known = {f.name for f in dataclasses.fields(cls)} | {"store_projector"} if dataclasses.is_dataclass(cls) else set()
        unknown = sorted(set(kwargs) - known)
        if known and unknown:
            # TypeError (peft's convention), worded so that peft's filter in from_peft_type does not swallow it
            raise TypeError(f"PiCaConfig: unknown field(s) {unknown}; known fields are {sorted(known)}")
        return super().__new__(cls)

    def __post_init__(self, store_projector: Optional[bool]) -> None:
        super().__post_init__()
        if store_projector is not None and (not isinstance(store_projector, bool)
                                            or (self.projector_storage == "full") != store_projector):
            raise ValueError(f"PiCaConfig.store_projector={store_projector!r} (older name of projector_storage) "
                             f"contradicts projector_storage={self.projector_storage!r}")
        self.peft_type = PICA_PEFT_TYPE
        for name in ("rank", "subspace_seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "rank" else 0):
                raise ValueError(f"PiCaConfig.{name} must be a {'positive' if name == 'rank' else 'non-negative'} "
                                 f"int, got {value!r}")
        for name in ("target_modules", "exclude_modules"):
            if isinstance(getattr(self, name), (set, tuple)):
                setattr(self, name, sorted(getattr(self, name)))
            value = getattr(self, name)
            if not (value is None or isinstance(value, str)
                    or isinstance(value, list) and all(isinstance(item, str) and item for item in value)):
                raise ValueError(f"PiCaConfig.{name} must be None, a regex str or a list of names, got {value!r}")
        if self.target_modules is not None and len(self.target_modules) == 0:
            raise ValueError("PiCaConfig.target_modules is empty; give module names or leave it None for defaults")
        for name in ("share_across_layers", "inference_mode", "init_weights"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"PiCaConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if self.projector_storage == "none":  # files of earlier pica: no sketch; they load unchecked, as saved
            logger.warning("PiCaConfig.projector_storage='none' was removed; using 'compact' (a sketch per layer "
                           "checks the recomputed P): files saved with 'none' still load, P recomputed unchecked")
            self.projector_storage, self.__dict__["unsketched"] = "compact", True
        if self.forward_mode in _REMOVED_FORWARD_MODES:  # e.g. an adapter_config.json of pica 0.2
            logger.warning("PiCaConfig.forward_mode=%r was removed; using 'auto', which computes the merged product "
                           "where it is exact and cheaper (the same outputs)", self.forward_mode)
            self.forward_mode = "auto"
        for name, choices in _CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"PiCaConfig.{name} must be one of {choices}, got {getattr(self, name)!r}")
        layers = [self.layers_to_transform] if isinstance(self.layers_to_transform, int) else self.layers_to_transform
        if layers is not None and not (isinstance(layers, list) and all(
                isinstance(i, int) and not isinstance(i, bool) for i in layers)):
            raise ValueError(f"PiCaConfig.layers_to_transform must be an int or list of ints, got {self.layers_to_transform!r}")
        if self.layers_pattern is not None and self.layers_to_transform is None:
            raise ValueError("PiCaConfig.layers_pattern needs layers_to_transform to be set")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("PiCaConfig.layers_to_transform cannot be used when target_modules is a regex str")
        if self.modules_to_save is not None and not (
                isinstance(self.modules_to_save, list) and all(isinstance(m, str) for m in self.modules_to_save)):
            raise ValueError(f"PiCaConfig.modules_to_save must be a list of str, got {self.modules_to_save!r}")
        check_record(self.base_quantization)
