"""Exact PiCa → PEFT-LoRA export.

PiCa's update ``ΔW_i = M_g P_i`` is a rank-``rank`` LoRA with ``A = P_i (rank×in)``,
``B = M_g (out×rank)`` and scale ``lora_alpha / r = 1``, so the export is exact.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file
from transformers.pytorch_utils import Conv1D

from .tuner.config import PiCaConfig
from .tuner.layer import PiCaLayer

logger = logging.getLogger(__name__)

__all__ = ["export_lora"]


def export_lora(
    model: PeftModel,
    out_dir: str | os.PathLike,
    adapter_name: str = "default",
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Write adapter ``adapter_name`` of a PiCa ``PeftModel`` as a standard PEFT LoRA adapter directory.

    Args:
        model: a ``PeftModel`` holding PiCa adapter ``adapter_name``.
        out_dir: directory to create (written to a temporary sibling, then renamed).
        adapter_name: which PiCa adapter to export.
        dtype: dtype of the LoRA tensors (default: the base model's dtype).
        overwrite: replace an existing ``out_dir``.

    Returns:
        The output directory.

    Raises:
        ValueError: unknown adapter, not a PiCa adapter, or ``out_dir`` exists without ``overwrite``.
    """
    out_dir = Path(out_dir)
    if not isinstance(model.peft_config.get(adapter_name), PiCaConfig):
        raise ValueError(f"export_lora: no PiCa adapter named {adapter_name!r}; have {sorted(model.peft_config)}")
    if out_dir.exists() and not overwrite:
        raise ValueError(f"export_lora: {out_dir} exists; pass overwrite=True to replace it")
    config = model.peft_config[adapter_name]
    base = model.get_base_model()
    dtype = dtype or next(base.parameters()).dtype
    tensors: dict[str, torch.Tensor] = {}
    targets, conv1d = [], False
    for name, layer in base.named_modules():
        if isinstance(layer, PiCaLayer) and adapter_name in layer.pica_P:
            targets.append(name)
            conv1d = conv1d or isinstance(layer.get_base_layer(), Conv1D)
            prefix = f"base_model.model.{name}"
            tensors[f"{prefix}.lora_A.weight"] = layer.pica_P[adapter_name].detach().to(dtype).contiguous()
            # LoRA has no sharing: every layer gets its own copy of the group's M
            tensors[f"{prefix}.lora_B.weight"] = layer.get_update(adapter_name).detach().to(dtype).clone()
    extra = get_peft_model_state_dict(model, adapter_name=adapter_name)
    tensors.update({k: v.detach().to(dtype).contiguous() for k, v in extra.items() if ".pica_" not in k})
    lora = LoraConfig(
        r=config.rank, lora_alpha=config.rank, lora_dropout=0.0, target_modules=targets, fan_in_fan_out=conv1d,
        modules_to_save=config.modules_to_save, task_type=config.task_type, bias="none",
        base_model_name_or_path=config.base_model_name_or_path, revision=config.revision,
    )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        lora.save_pretrained(staging)
        save_file(tensors, staging / "adapter_model.safetensors", metadata={"format": "pt"})
        previous = out_dir.with_name(f".{out_dir.name}.previous") if out_dir.exists() else None
        if previous is not None:
            os.replace(out_dir, previous)  # the old export stays whole until the new one is in place
        os.replace(staging, out_dir)
        if previous is not None:
            shutil.rmtree(previous)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    logger.info("Exported PiCa adapter %r as LoRA rank %d (%d layers) to %s", adapter_name, config.rank, len(targets),
                out_dir)
    return out_dir
