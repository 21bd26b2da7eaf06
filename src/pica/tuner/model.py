"""``PiCaModel``: the peft ``BaseTuner`` that injects PiCa layers."""

from __future__ import annotations

from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTuner, _maybe_include_all_linear_layers
from torch import nn

from . import integration, serialization
from .config import PiCaConfig
from .layer import Linear, PiCaLayer
from .plan import AdapterPlan, plan_adapter
from .registration import PICA_PREFIX
from .targets import DEFAULT_TARGET_MODULES

__all__ = ["PiCaModel"]

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


class PiCaModel(BaseTuner):
    """Wraps a model with PiCa adapters. Use it through ``peft.get_peft_model(model, PiCaConfig(...))``.

    All validation and every projector are computed before the first module is replaced, so an
    error leaves the model untouched.
    """

    prefix: str = PICA_PREFIX
    tuner_layer_cls = PiCaLayer
    target_module_mapping = DEFAULT_TARGET_MODULES

    def __init__(self, model: nn.Module, config: Any, adapter_name: str, **kwargs: Any) -> None:
        self._pica_plans: dict[str, AdapterPlan] = {}
        super().__init__(model, config, adapter_name, **kwargs)

    def _prepare_adapter_config(self, peft_config: PiCaConfig, model_config: dict) -> PiCaConfig:
        if peft_config.target_modules is None:
            model_type = model_config.get("model_type")
            defaults = self.target_module_mapping.get(model_type)
            if defaults is None:
                raise ValueError(
                    f"PiCaConfig.target_modules is not set and model_type {model_type!r} has no default; known: "
                    f"{sorted(self.target_module_mapping)}"
                )
            peft_config.target_modules = list(defaults)
        return peft_config

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        """Plan (validate, compute projectors), then let peft replace the modules."""
        config = self.peft_config[adapter_name]
        self._prepare_adapter_config(config, self.get_model_config(model))
        config = _maybe_include_all_linear_layers(config, model)
        self._pica_plans[adapter_name] = plan_adapter(
            model,
            rank=config.rank,
            share_across_layers=config.share_across_layers,
            projector_dtype=_DTYPES[config.projector_dtype],
            is_target=lambda key: self._check_target_module_exists(config, key),
            target_description=config.target_modules,
            subspace=config.subspace,
            subspace_seed=config.subspace_seed,
            compute_projectors=not (config.store_projector and integration.projectors_from_file()),
        )
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
        finally:
            del self._pica_plans[adapter_name]

    def _create_and_replace(
        self,
        peft_config: PiCaConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        parameter_name: Optional[str] = None,
    ) -> None:
        plan = self._pica_plans[adapter_name]
        if current_key not in plan.layers:
            raise ValueError(f"PiCa: module {current_key} was not planned for adapter '{adapter_name}'")
        layer_plan = plan.layers[current_key]
        group = layer_plan.group
        update = plan.leaders.get(group, plan.updates[group])  # the leader layer, or M for the leader
        args = (adapter_name, update, layer_plan.projector, layer_plan.fingerprint, group)
        pending = layer_plan.projector_pending
        if isinstance(target, PiCaLayer):
            layer = target
            layer.update_layer(*args, inference_mode=peft_config.inference_mode, projector_pending=pending)
            layer.pica_forward_mode = peft_config.forward_mode
        else:
            layer = Linear(target, adapter_name, forward_mode=peft_config.forward_mode)
            layer.update_layer(*args, inference_mode=peft_config.inference_mode, projector_pending=pending)
            if adapter_name not in self.active_adapters:
                layer.requires_grad_(False)
            self._replace_module(parent, target_name, layer, target)
        plan.leaders.setdefault(group, layer)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """Keep ``M`` and ``P`` in float32 whatever the model dtype (peft's cast would untie ``M``)."""

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        selected = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        return serialization.select_for_save(model, config, adapter_name, selected)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        return serialization.check_for_load(model, config, adapter_name, remapped)
