"""``PiCaModel``: the peft ``BaseTuner`` that injects PiCa layers and owns every shared ``M``, registered once in
``self.pica_M[adapter][key]`` (``key``: the group with ``/`` for ``.``, :func:`pica.grouping.update_key`), so
``base_model.pica_M.<adapter>.<key>`` in a ``PeftModel`` and ``base_model.pica_M.<key>`` in the adapter file."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTuner, _maybe_include_all_linear_layers
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn

from ..base_weights import guard_quantized_layers, is_quantized
from ..row_adapters import adapter_names_per_row
from . import adapter_state, loading
from .config import DEFAULT_TARGET_MODULES, PICA_PREFIX, PiCaConfig
from .layer import Linear, PiCaLayer, check_merge, merged_adapter_names, pica_layers
from .plan import AdapterPlan, plan_adapter

__all__ = ["PiCaModel"]

class PiCaModel(BaseTuner):
    """PiCa's tuner: ``peft.get_peft_model(model, PiCaConfig(...))``. Everything is validated and every projector
    computed before the first module is replaced, so an error leaves the model untouched."""

    prefix: str = PICA_PREFIX
    tuner_layer_cls = PiCaLayer
    target_module_mapping = DEFAULT_TARGET_MODULES
    uses_shared_state = True  # M lives here: peft's inject_adapter_in_model (no tuner kept) refuses PiCa

    def __init__(self, model: nn.Module, config: Any, adapter_name: str, **kwargs: Any) -> None:
        self._pica_plans: dict[str, AdapterPlan] = {}
        super().__init__(model, config, adapter_name, **kwargs)

    def _prepare_adapter_config(self, peft_config: PiCaConfig, model_config: dict) -> PiCaConfig:
        model_type = model_config.get("model_type")
        if peft_config.target_modules is None and (defaults := self.target_module_mapping.get(model_type)) is None:
            raise ValueError(f"PiCaConfig.target_modules is not set and model_type {model_type!r} has no default. Please "
                             f"specify `target_modules` in `peft_config` (model types with a default: "
                             f"{sorted(self.target_module_mapping)})")
        if peft_config.target_modules is None:
            peft_config.target_modules = defaults if isinstance(defaults, str) else list(defaults)
        return peft_config

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        """Plan (validate, compute or take the projectors, create ``M``), then let peft replace the modules; the
        other adapters' ``M`` keep their ``requires_grad``. Raises ``ValueError``: a planning error, or an adapter
        is merged (the new projectors would be taken from merged weights)."""
        if merged := merged_adapter_names(model):
            raise ValueError(f"PiCa adapter(s) {merged} are merged into the base weights; call unmerge_adapter() "
                             f"before adding adapter '{adapter_name}' (its projectors are taken from W0)")
        config = self.peft_config[adapter_name]
        self._prepare_adapter_config(config, self.get_model_config(model))
        config = _maybe_include_all_linear_layers(config, model)
        plan = plan_adapter(model, config, lambda key: self._check_target_module_exists(config, key),
                            loading.projectors_being_loaded(adapter_name, config))
        config.base_quantization = plan.quantization
        if not config.init_weights:  # peft's init_weights=False: an adapter that changes the output (tests)
            with torch.no_grad():
                for update in plan.updates.values():
                    update.normal_(0.0, 0.1 / config.rank ** 0.5)
        if "pica_M" not in self._modules:
            self.pica_M = nn.ModuleDict()
        self.pica_M[adapter_name] = nn.ParameterDict(plan.updates)
        self._pica_plans[adapter_name] = plan
        trainable = [(update, update.requires_grad) for name, updates in self._updates().items()
                     if name != adapter_name for update in updates.values()]
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
        except BaseException:
            del self.pica_M[adapter_name]
            raise
        finally:
            del self._pica_plans[adapter_name]
            for update, requires_grad in trainable:
                update.requires_grad_(requires_grad)
        guard_quantized_layers(model)

    def _create_and_replace(self, peft_config: PiCaConfig, adapter_name: str, target: nn.Module, target_name: str,
                            parent: nn.Module, current_key: str, parameter_name: Optional[str] = None) -> None:
        layer_plan = self._pica_plans[adapter_name].layers.get(current_key)
        if layer_plan is None:
            raise ValueError(f"PiCa: module {current_key} was not planned for adapter '{adapter_name}'")
        layer = target if isinstance(target, PiCaLayer) else Linear(target, adapter_name, self.pica_M)
        layer.update_layer(adapter_name, **vars(layer_plan), inference_mode=peft_config.inference_mode)
        layer.pica_forward_mode = peft_config.forward_mode
        if layer is not target:
            if adapter_name not in self.active_adapters:
                layer.requires_grad_(False)
            self._replace_module(parent, target_name, layer, target)

    # ------------------------------------------------------------------ M: trainability and lifetime

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Activate adapter(s); their ``M`` become trainable unless ``inference_mode``."""
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        active = {adapter_name} if isinstance(adapter_name, str) else set(adapter_name)
        for name, updates in self._updates().items():
            updates.requires_grad_(name in active and not inference_mode)

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        """Enable or disable gradients of the given adapter(s), ``M`` included."""
        super().set_requires_grad(adapter_names, requires_grad=requires_grad)
        names = {adapter_names} if isinstance(adapter_names, str) else set(adapter_names)
        for name, updates in self._updates().items():
            if name in names:
                updates.requires_grad_(requires_grad)

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        """peft's switch of every layer (``disable_adapter()`` and friends); ``M`` lives on the tuner, so it
        follows here: no ``M`` is trainable while adapters are disabled, and each gets its flag back after."""
        super()._enable_adapter_layers(enabled)
        updates = list(self._updates().parameters())
        if not enabled:
            self.__dict__.setdefault("_pica_trainable_before_disable", {id(u): u.requires_grad for u in updates})
            for update in updates:
                update.requires_grad_(False)
            return
        before = self.__dict__.pop("_pica_trainable_before_disable", {})
        for update in updates:
            update.requires_grad_(before.get(id(update), update.requires_grad))

    def delete_adapter(self, adapter_name: str) -> None:
        """Delete an adapter, its layers' state and its ``M``."""
        super().delete_adapter(adapter_name)
        if adapter_name in self._updates():
            del self._updates()[adapter_name]

    def _updates(self) -> nn.ModuleDict:
        return self._modules.get("pica_M") or nn.ModuleDict()

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """peft's ``autocast_adapter_dtype``: True (default) keeps ``M`` in float32; False stores each ``M`` in its
        layers' bf16/fp16 base dtype, in which the PiCa term is then computed (``P`` stays float32, cast per call);
        quantised or float32 bases keep a float32 ``M``."""
        if autocast_adapter_dtype or adapter_name not in self._updates():
            return
        dtypes: dict[str, torch.dtype] = {}
        for _, layer in pica_layers(self.model, adapter_name):
            weight = layer.get_base_layer().weight
            if not is_quantized(layer.get_base_layer()) and weight.dtype in (torch.float16, torch.bfloat16):
                dtypes.setdefault(layer.pica_group[adapter_name], weight.dtype)
        for key, update in self._updates()[adapter_name].items():
            if key in dtypes:
                cast = update.data.to(dtypes[key])
                # low_cpu_mem_usage=True: M is still meta here; peft calls again after the load, with values
                if cast.device.type != "meta" and not torch.isfinite(cast).all():
                    raise ValueError(f"PiCa adapter '{adapter_name}': M of group '{key}' does not fit in "
                                     f"{dtypes[key]} (autocast_adapter_dtype=False); keep the default True")
                update.data = cast

    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """Around every forward and generate (peft): ``adapter_names`` (one per row, ``"__base__"`` for the base) goes
        to every PiCa layer and ``modules_to_save`` wrapper, repeated per beam (``num_beams``) except in an
        encoder. Raises ``ValueError``: ``alora_offsets`` (aLoRA); ``adapter_names`` in training mode, with a
        merged adapter, or naming an unknown adapter."""
        if kwargs.get("alora_offsets") is not None:
            raise ValueError("PiCa does not support alora_offsets (an aLoRA feature); peft would ignore it")
        adapter_names = kwargs.get("adapter_names")
        if adapter_names is None:
            yield
            return
        if not isinstance(adapter_names, (list, tuple)) or not all(isinstance(n, str) for n in adapter_names):
            raise ValueError(f"adapter_names must be a list of adapter names, one per row, got {adapter_names!r}")
        if self.training:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode. (peft's wording; "
                             "mixed-adapter batches are for inference: call model.eval())")
        if merged := merged_adapter_names(self.model):
            raise ValueError("Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` "
                             f"first. (merged: {merged})")
        if unknown := sorted({n for n in adapter_names if n != "__base__"} - set(self.peft_config)):
            raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(unknown)}. (peft's wording; "
                             f"adapter_names names adapter(s) that do not exist: {unknown}; adapters: "
                             f"{sorted(self.peft_config)} (and '__base__'))")
        config = getattr(self.model, "config", None)  # custom models have none
        encoder = self.model.get_encoder() if getattr(config, "is_encoder_decoder", False) else None
        with adapter_names_per_row(self.model, lambda m: isinstance(m, (PiCaLayer, AuxiliaryTrainingWrapper)),
                                   adapter_names, kwargs.get("num_beams"), encoder):
            yield

    # ------------------------------------------------------------------ merging

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        """Merge into the base weights; every layer is checked (:func:`pica.tuner.layer.check_merge`) before any
        changes. Raises ``ValueError`` for an unknown adapter name (peft would merge nothing for it)."""
        self._check_merge(adapter_names, safe_merge)
        super().merge_adapter(adapter_names=adapter_names)

    def _unload_and_optionally_merge(self, merge: bool = True, progressbar: bool = False, safe_merge: bool = False,
                                     adapter_names: Optional[list[str]] = None) -> nn.Module:
        if merge:
            self._check_merge(adapter_names, safe_merge)
        return super()._unload_and_optionally_merge(merge=merge, progressbar=progressbar, adapter_names=adapter_names)

    def _check_merge(self, adapter_names: Optional[list[str]], safe_merge: bool) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else adapter_names
        if unknown := [name for name in names or () if name not in self.peft_config]:
            raise ValueError(f"PiCa: no adapter named {unknown}; adapters: {sorted(self.peft_config)}; nothing merged")
        check_merge(dict(pica_layers(self.model)), names, safe_merge)

    # ------------------------------------------------------------------ adapter files (peft's hooks)

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        for _, layer in pica_layers(model, adapter_name):
            layer.check_projector(adapter_name)  # an adapter made on a meta-device base and never loaded
        return adapter_state.select_for_save(model, config, adapter_name, state_dict)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        return loading.check_for_model(model, config, adapter_name, adapter_state.to_model_keys(model, config, adapter_name, state_dict))
