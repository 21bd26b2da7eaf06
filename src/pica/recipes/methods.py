"""One function per method: the same base model, adapted by peft (PiCa, LoRA, DoRA, VeRA, PiSSA),
fully trainable (``full``), or frozen except the task head (``probe``)."""

from __future__ import annotations

import logging
from typing import Optional

from peft import LoraConfig, PeftModel, TaskType, VeraConfig, get_peft_model
from torch import nn

from ..tuner.config import PiCaConfig
from ..tuner.config import DEFAULT_TARGET_MODULES
from .config import WHOLE_MODEL_METHODS, RecipeConfig
from .heads import head_modules as resolve_heads

logger = logging.getLogger(__name__)

__all__ = ["PEFT_TASK_TYPES", "adapter_task_kind", "apply_method", "parameter_split", "target_modules_for"]

PEFT_TASK_TYPES: dict[str, str] = {"classification": TaskType.SEQ_CLS.value, "generative": TaskType.CAUSAL_LM.value}
"""peft's ``task_type`` of a text adapter for each task kind (an image classifier's adapter has none)."""


def adapter_task_kind(task_type: object) -> Optional[str]:
    """The task kind of an adapter whose ``adapter_config.json`` records ``task_type`` (None if it is neither)."""
    return next((kind for kind, recorded in PEFT_TASK_TYPES.items() if recorded == task_type), None)

def target_modules_for(model: nn.Module, recipe: RecipeConfig) -> list[str] | str:
    """The recipe's targets, else PiCa's default for the model type (used by every method)."""
    if recipe.target_modules:
        return list(recipe.target_modules)
    model_type = getattr(model.config, "model_type", None)
    if model_type not in DEFAULT_TARGET_MODULES:
        raise ValueError(f"no default target_modules for model_type {model_type!r}; set target_modules "
                         f"(known types: {sorted(DEFAULT_TARGET_MODULES)})")
    defaults = DEFAULT_TARGET_MODULES[model_type]
    return defaults if isinstance(defaults, str) else list(defaults)  # a str is a regex over module paths


def apply_method(model: nn.Module, method: str, recipe: RecipeConfig, task_kind: str,
                 head_modules: Optional[list[str]] = None, weightless: bool = False,
                 modality: str = "text") -> nn.Module:
    """Return the model to train with ``method`` (a ``PeftModel`` for adapter methods).

    ``modality="image"``: the adapter gets no peft task type (peft's sequence-classification wrapper
    passes ``input_ids``, which an image classifier does not take); the head is kept trainable by
    ``modules_to_save`` all the same.

    ``weightless``: ``model`` lives on the ``meta`` device (a shape check, see
    :mod:`pica.recipes.preflight`); peft's methods then skip their weight initialisation
    (``low_cpu_mem_usage``), which needs values. PiCa needs no such switch: it never reads a meta weight.
    """
    heads = resolve_heads(model, task_kind, head_modules)
    children = dict(model.named_children())
    unknown = [name for name in heads if name not in children]
    if unknown:
        raise ValueError(f"head_modules {unknown} are not top-level modules of {type(model).__name__} "
                         f"(its modules: {sorted(children)})")
    if method in WHOLE_MODEL_METHODS:
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(method == "full" or name.split(".")[0] in heads)
        return model
    task_type = None if modality == "image" else TaskType(PEFT_TASK_TYPES[task_kind])
    targets = target_modules_for(model, recipe)
    saved = list(heads) or None  # a copy: peft extends modules_to_save in place (adds classifier/score for SEQ_CLS)
    if method == "pica":
        config = PiCaConfig(rank=recipe.rank, target_modules=targets, share_across_layers=recipe.share,
                            subspace=recipe.subspace, subspace_seed=recipe.subspace_seed, modules_to_save=saved,
                            task_type=task_type)
    elif method in ("lora", "dora", "pissa"):
        alpha = recipe.lora_alpha if recipe.lora_alpha is not None else (recipe.rank if method == "pissa"
                                                                          else 2 * recipe.rank)
        config = LoraConfig(r=recipe.rank, lora_alpha=alpha, lora_dropout=recipe.lora_dropout,
                            target_modules=targets, modules_to_save=saved, task_type=task_type,
                            use_dora=method == "dora",
                            init_lora_weights="pissa_niter_4" if method == "pissa" else True)
    elif method == "vera":
        config = VeraConfig(r=recipe.rank, target_modules=targets, modules_to_save=saved, task_type=task_type)
    else:
        raise ValueError(f"unknown method {method!r}")
    return get_peft_model(model, config, low_cpu_mem_usage=weightless and method != "pica")


def parameter_split(model: nn.Module, head_modules: list[str]) -> dict[str, int]:
    """Trainable parameters: ``adapter`` (everything trainable outside the head; the whole body for
    ``full``), ``head``, ``total``; and ``model_total`` (all parameters, trainable or not)."""
    heads = set(head_modules)
    adapter = head = total = 0
    for name, parameter in model.named_parameters():
        total += parameter.numel()
        if not parameter.requires_grad:
            continue
        parts = name.split(".")
        if isinstance(model, PeftModel):
            parts = parts[2:]  # base_model.model.<...>
        if parts and parts[0] in heads:
            head += parameter.numel()
        else:
            adapter += parameter.numel()
    return {"adapter": adapter, "head": head, "total": adapter + head, "model_total": total}
