"""Exact export of a PiCa adapter for serving: as a PEFT LoRA adapter, or merged into the weights.

PiCa's update ``ΔW_i = M_g P_i`` is a rank-``rank`` LoRA with ``A = P_i (rank×in)``,
``B = M_g (out×rank)`` and scale ``lora_alpha / r = 1``, so the LoRA export is exact. The merged
export writes ``W_i = W0_i + M_g P_i`` into a plain transformers checkpoint.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel
from peft.utils import ModulesToSaveWrapper, get_peft_model_state_dict
from safetensors.torch import save_file
from transformers.pytorch_utils import Conv1D

from .io import atomic_directory
from .tuner.config import PiCaConfig
from .tuner.layer import PiCaLayer, base_weight_out_in, pica_layers
from .base_weights import is_quantized, quantized_from_dtype

logger = logging.getLogger(__name__)

__all__ = ["VLLM_LORA_RANKS", "export_lora", "export_merged", "merged_state_dict", "serving_limits"]

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""Values vLLM accepts for ``--max-lora-rank`` (``MaxLoRARanks`` in vllm/config/lora.py; default 16)."""
VLLM_DEFAULT_MAX_LORA_RANK = 16


def _pica_config(model: PeftModel, adapter_name: str, what: str) -> PiCaConfig:
    configs = getattr(model, "peft_config", {})
    config = configs.get(adapter_name)
    if config is None:
        raise ValueError(f"{what}: no PiCa adapter named {adapter_name!r} in the model; adapters: {sorted(configs)}")
    if not isinstance(config, PiCaConfig):
        peft_type = getattr(getattr(config, "peft_type", None), "value", None) or type(config).__name__
        advice = ("a LoRA adapter needs no export: save or serve it as it is (merged: peft's merge_and_unload)"
                  if str(peft_type).upper() == "LORA" else "merge it with peft's merge_and_unload() instead")
        raise ValueError(f"{what}: adapter {adapter_name!r} is a {peft_type} adapter, not PiCa; {what} converts "
                         f"PiCa adapters only; {advice}")
    return config


def _inputs(config: PiCaConfig) -> dict[str, str | None]:
    """What an export must never replace: the base model directory (the working directory always)."""
    base = config.base_model_name_or_path
    return {"base model (base_model_name_or_path)": base if base and Path(base).is_dir() else None}


def serving_limits(rank: int, modules_to_save: list[str] | None) -> list[str]:
    """Where an exported LoRA adapter falls outside what common serving engines accept.

    Sources: vLLM's ``LoRAConfig.max_lora_rank`` (allowed values :data:`VLLM_LORA_RANKS`, default 16,
    vllm/config/lora.py) and ``PEFTHelper._validate_features`` (vllm/lora/peft_helper.py), which
    rejects adapters with ``modules_to_save``.

    Returns:
        One human-readable line per limit crossed (empty if none).
    """
    problems = []
    if rank > max(VLLM_LORA_RANKS):
        problems.append(
            f"rank {rank} is above vLLM's largest --max-lora-rank ({max(VLLM_LORA_RANKS)}); serve a merged "
            "checkpoint (pica.export_merged) instead"
        )
    elif rank > VLLM_DEFAULT_MAX_LORA_RANK:
        needed = min(r for r in VLLM_LORA_RANKS if r >= rank)
        problems.append(
            f"rank {rank} is above vLLM's default --max-lora-rank {VLLM_DEFAULT_MAX_LORA_RANK}; "
            f"start vLLM with --max-lora-rank {needed}"
        )
    if modules_to_save:
        problems.append(
            f"modules_to_save {modules_to_save} are fully trained modules, which vLLM's LoRA loader refuses "
            "('only supports modules_to_save being None'); serve a merged checkpoint (pica.export_merged) instead"
        )
    return problems


def export_lora(
    model: PeftModel,
    out_dir: str | os.PathLike,
    adapter_name: str = "default",
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Write adapter ``adapter_name`` of a PiCa ``PeftModel`` as a standard PEFT LoRA adapter directory.

    ``adapter_config.json`` has ``peft_type: LORA``, ``r = lora_alpha = rank`` (scale exactly 1), the
    exact module paths as ``target_modules``, ``fan_in_fan_out`` for GPT-2 ``Conv1D`` layers and the
    PiCa config's ``modules_to_save``. Per layer, ``lora_A = P_i (rank×in)`` and ``lora_B = M_g
    (out×rank)`` (a copy per layer: LoRA has no sharing). Limits of serving engines that the result
    crosses are logged as warnings (:func:`serving_limits`).

    Args:
        model: a ``PeftModel`` holding PiCa adapter ``adapter_name``.
        out_dir: directory to create (written to a temporary sibling, then renamed).
        adapter_name: which PiCa adapter to export.
        dtype: dtype of the LoRA tensors (default: the base model's dtype).
        overwrite: replace an existing ``out_dir``.

    Returns:
        The output directory.

    Raises:
        ValueError: no PiCa adapter of that name.
        FileExistsError: ``out_dir`` exists and ``overwrite`` is False.
        pica.io.OutputWouldDeleteInputError: with ``overwrite``, ``out_dir`` is or contains the base
            model directory (``base_model_name_or_path``) or the current directory.
    """
    config = _pica_config(model, adapter_name, "export_lora")
    base = model.get_base_model()
    dtype = dtype or next(base.parameters()).dtype
    layers = dict(pica_layers(model.get_base_model(), adapter_name))
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        prefix = f"base_model.model.{name}"
        tensors[f"{prefix}.lora_A.weight"] = layer.pica_P[adapter_name].detach().to(dtype).contiguous()
        tensors[f"{prefix}.lora_B.weight"] = layer.get_update(adapter_name).detach().to(dtype).clone()
    extra = get_peft_model_state_dict(model, adapter_name=adapter_name)
    tensors.update({key: value.detach().to(dtype).contiguous() for key, value in extra.items() if ".pica_" not in key})
    lora = LoraConfig(
        r=config.rank, lora_alpha=config.rank, lora_dropout=0.0, target_modules=sorted(layers),
        fan_in_fan_out=any(isinstance(layer.get_base_layer(), Conv1D) for layer in layers.values()),
        modules_to_save=config.modules_to_save, task_type=config.task_type, bias="none",
        base_model_name_or_path=config.base_model_name_or_path, revision=config.revision,
    )
    with atomic_directory(out_dir, overwrite, "export_lora", _inputs(config)) as staging:
        lora.save_pretrained(staging)
        save_file(tensors, staging / "adapter_model.safetensors", metadata={"format": "pt"})
    for problem in serving_limits(config.rank, config.modules_to_save):
        logger.warning("export_lora(%s): %s", out_dir, problem)
    logger.info("Exported PiCa adapter %r as LoRA rank %d (%d layers) to %s", adapter_name, config.rank, len(layers),
                out_dir)
    return Path(out_dir)


def merged_state_dict(model: PeftModel, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The base model's state dict with adapter ``adapter_name`` merged, under the plain model's keys.

    The live model is not modified: merged weights ``W0 + M P`` are new tensors (computed in fp32,
    stored on the CPU in the base weight's dtype); every other tensor is the model's own. PiCa layers
    lose their ``base_layer.`` level and ``pica_*`` tensors; a ``modules_to_save`` wrapper contributes
    the adapter's trained copy (or the original module if the adapter has none). Quantised (bitsandbytes)
    layers, adapted or not, become full-precision ``weight`` tensors: de-quantised ``W0`` (``+ M P``) in
    the dtype they were quantised from, without their quantisation states.

    Raises:
        ValueError: no PiCa adapter of that name, the adapter belongs to another base model, or the
            merge gives non-finite weights (naming the module).
    """
    _pica_config(model, adapter_name, "merged_state_dict")
    base = model.get_base_model()
    renames: dict[str, str] = {}  # key prefix in the wrapped model → key prefix in the plain model
    dropped: list[str] = []
    merged: dict[str, torch.Tensor] = {}
    quantization_keys: list[str] = []  # plain-model key prefixes of quantisation states (absmax, SCB, ...)
    for name, module in base.named_modules():
        if is_quantized(module) or (isinstance(module, PiCaLayer) and is_quantized(module.get_base_layer())):
            quantization_keys += [f"{name}.weight.", f"{name}.SCB", f"{name}.weight_format"]
        if is_quantized(module) and not isinstance(module, PiCaLayer):  # a quantised layer PiCa does not adapt
            merged[f"{name}.weight"] = base_weight_out_in(module).detach().cpu().contiguous()  # (out, in)
        elif isinstance(module, PiCaLayer):
            renames[f"{name}.base_layer."] = f"{name}."
            dropped.append(f"{name}.pica_")
            if adapter_name in module.pica_P or module.merged_adapters:
                base_layer = module.get_base_layer()
                new = base_weight_out_in(base_layer).detach().float()  # (out, in), with any merged adapters in it
                for merged_name in module.merged_adapters:  # back to W0: never count an adapter twice
                    new = new - module.get_delta_weight(merged_name).detach().float()
                if adapter_name in module.pica_P:
                    new = new + module.get_delta_weight(adapter_name).detach().float()  # (out, in)
                if not torch.isfinite(new).all():
                    raise ValueError(f"merging PiCa adapter '{adapter_name}' into {name} gives non-finite weights")
                new = new.T if isinstance(base_layer, Conv1D) else new  # back to the storage layout
                dtype = quantized_from_dtype(base_layer) if is_quantized(base_layer) else base_layer.weight.dtype
                merged[f"{name}.weight"] = new.to(dtype).cpu().contiguous()
        elif isinstance(module, ModulesToSaveWrapper):
            trained = adapter_name in module.modules_to_save
            renames[f"{name}.modules_to_save.{adapter_name}." if trained else f"{name}.original_module."] = f"{name}."
            dropped += [f"{name}.modules_to_save.", f"{name}.original_module."]
    result: dict[str, torch.Tensor] = {}
    for key, value in base.state_dict().items():
        source = next((prefix for prefix in renames if key.startswith(prefix)), None)
        if source is not None:
            key = renames[source] + key[len(source):]
        elif any(key.startswith(prefix) for prefix in dropped):
            continue
        if key.startswith(tuple(quantization_keys)):
            continue
        result[key] = merged.get(key, value)
    return result


def export_merged(
    model: PeftModel,
    out_dir: str | os.PathLike,
    adapter_name: str = "default",
    tokenizer: Any = None,
    overwrite: bool = False,
    max_shard_size: int | str = "5GB",
) -> Path:
    """Save the base model with adapter ``adapter_name`` merged as a plain transformers checkpoint.

    Loadable with ``AutoModelFor*.from_pretrained(out_dir)`` (safetensors, the base model's config and
    generation config), with the same outputs as the PiCa model up to float rounding. From a quantised
    (bitsandbytes) base it is a full-precision checkpoint of the de-quantised ``W0 + M P`` (and of every
    other de-quantised layer), without ``quantization_config``, and a warning says so. The live model is
    left untouched (see :func:`merged_state_dict`); no copy of the model is made, only of the merged
    weights. The tokenizer (or processor) is saved too if one is given, or else if the adapter's
    ``base_model_name_or_path`` is a local directory holding one.

    Args:
        model: a ``PeftModel`` holding PiCa adapter ``adapter_name``.
        out_dir: directory to create (written to a temporary sibling, then renamed).
        adapter_name: which PiCa adapter to merge.
        tokenizer: a tokenizer/processor (anything with ``save_pretrained``) to save alongside.
        overwrite: replace an existing ``out_dir``.
        max_shard_size: passed to ``save_pretrained``.

    Returns:
        The output directory.

    Raises:
        ValueError: see :func:`merged_state_dict`.
        FileExistsError: ``out_dir`` exists and ``overwrite`` is False.
        pica.io.OutputWouldDeleteInputError: with ``overwrite``, ``out_dir`` is or contains the base
            model directory (``base_model_name_or_path``) or the current directory.
    """
    config = _pica_config(model, adapter_name, "export_merged")
    state = merged_state_dict(model, adapter_name)
    if tokenizer is None:
        tokenizer = _local_tokenizer(config.base_model_name_or_path)
    base = model.get_base_model()
    quantized = [name for name, module in base.named_modules() if is_quantized(module)]
    if quantized:
        base = _unquantized_skeleton(base)
        logger.warning("export_merged(%s): the base model is quantised (%d bitsandbytes layers); writing a full-precision "
                       "checkpoint of the de-quantised weights with W0 + M P merged (no quantization_config: pass one "
                       "to from_pretrained to quantise it again)", out_dir, len(quantized))
    with atomic_directory(out_dir, overwrite, "export_merged", _inputs(config)) as staging:
        base.save_pretrained(staging, state_dict=state, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
    logger.info("Exported base model merged with PiCa adapter %r to %s", adapter_name, out_dir)
    return Path(out_dir)


def _unquantized_skeleton(model: torch.nn.Module) -> torch.nn.Module:
    """A weightless (meta-device) copy of ``model``'s architecture without its quantisation config, to save a
    full-precision state dict with (transformers saves a quantised model's own packed tensors instead)."""
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        skeleton = type(model)(config)
    skeleton.generation_config = copy.deepcopy(model.generation_config)
    return skeleton


def _local_tokenizer(path: str | None) -> Any:
    """The tokenizer saved in a local base-model directory, if there is one."""
    if not path or not Path(path).is_dir() or not (Path(path) / "tokenizer_config.json").is_file():
        return None
    from transformers import AutoTokenizer

    logger.info("export_merged: saving the tokenizer found in %s", path)
    return AutoTokenizer.from_pretrained(path)
