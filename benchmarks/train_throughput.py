"""Training throughput of a stack of real transformers decoder layers: frozen base vs PiCa (each
``forward_mode``) vs PEFT LoRA, in fp32, fp32 weights under bf16 autocast, and bf16 weights.

    PYTHONPATH=src python benchmarks/train_throughput.py                       # preset by device
    PYTHONPATH=src python benchmarks/train_throughput.py --preset gemma2b --layers 8 --seq 1024 --batch 8
    PYTHONPATH=src python benchmarks/train_throughput.py --quick               # tiny shapes, 2 rounds

One step is what ``Trainer`` does per batch: forward (``GemmaForCausalLM`` with random weights and
labels, cross-entropy loss), backward, ``torch.optim.AdamW.step()``, ``zero_grad(set_to_none=True)``.
Variants:

* ``frozen_base``: no trainable parameter; the embedding output requires grad, so backward runs
  through every layer (input gradient only), and there is no optimizer step.
* ``pica_<mode>``: one PiCa model (q, k, v, up, down; ``M`` fp32 by default), its
  ``pica_forward_mode`` switched per variant (the modes differ only in how the forward is computed).
* ``pica_factored_bf16_adapter`` (bf16 weights only): ``autocast_adapter_dtype=False``, i.e. ``M``
  stored and the PiCa term computed in bf16 instead of fp32.
* ``lora_r<r>``: PEFT LoRA on the same targets (alpha = r, dropout 0; peft keeps it fp32 by default).

Adapter variants take ``input_ids`` as Trainer passes them (no input gradient), unless gradient
checkpointing is on (then peft's input-require-grads applies to all). All variants of one precision
setting are timed in paired, interleaved rounds (order rotated each round); the ratio to the base is
the median over rounds of (variant time / base time in the same round).

Memory: resident bytes of each variant's model (parameters, buffers) and AdamW state, plus the peak
of the bytes allocated above that during one step: on CUDA ``torch.cuda.max_memory_allocated()``
minus ``memory_allocated()`` before the step (other variants' resident models do not change during
the step); on CPU the peak live bytes of the tensors created by aten ops during the step
(``_common.PeakTensorMemory``; torch keeps no CPU allocator statistics, and the process RSS
high-water mark cannot separate variants sharing one process).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peft
import transformers
from _common import PeakTensorMemory, emit, interleaved_medians, machine_info
from transformers import GemmaConfig, GemmaForCausalLM

import pica
from pica.tuner.layer import merged_form_applies

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]  # the paper's LLM groups
PICA_MODES = ("auto", "factored")
PRECISIONS = ("fp32", "autocast_bf16", "bf16")
logger = logging.getLogger("train_throughput")


@dataclass
class Shape:
    """Model and batch shape of one run (Gemma layout: ``num_heads * head_dim`` need not be ``hidden``)."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    vocab: int
    batch: int
    seq: int
    rank: int
    lora_ranks: list[int] = field(default_factory=list)


PRESETS: dict[str, Shape] = {
    # Gemma-2B layer shapes; vocab reduced from 256,000 (which would add a fixed LM-head cost to every variant).
    "gemma2b": Shape(hidden=2048, intermediate=16384, heads=8, kv_heads=1, head_dim=256, layers=4, vocab=32768,
                     batch=8, seq=1024, rank=256, lora_ranks=[32, 256]),
    # fp32 at 3 rounds: ~2.5 min on 2 shared AVX2 cores; the bf16 settings there take far longer (bf16 matmuls ran
    # 6x slower than fp32), so run them with smaller shapes on such a CPU (benchmarks/README.md).
    "cpu": Shape(hidden=1024, intermediate=4096, heads=4, kv_heads=1, head_dim=256, layers=2, vocab=4096,
                 batch=1, seq=256, rank=128, lora_ranks=[16]),
    "quick": Shape(hidden=64, intermediate=128, heads=2, kv_heads=1, head_dim=32, layers=1, vocab=128,
                   batch=1, seq=16, rank=8, lora_ranks=[4]),
}


@dataclass
class Variant:
    """One timed variant: its model, trainable parameters, optimizer and how to call it."""

    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    input_grad: bool
    pica_mode: str | None = None  # set on the PiCa layers before each step


def build_base(shape: Shape, dtype: torch.dtype, device: torch.device, checkpointing: bool) -> GemmaForCausalLM:
    """A ``GemmaForCausalLM`` with ``shape``'s dimensions and seed-0 random weights, frozen."""
    config = GemmaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                         num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                         num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim,
                         max_position_embeddings=max(shape.seq, 8), attn_implementation="sdpa")
    torch.manual_seed(0)
    model = GemmaForCausalLM(config).to(device=device, dtype=dtype)
    model.requires_grad_(False)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    return model


def build_variants(shape: Shape, precision: str, device: torch.device, checkpointing: bool) -> dict[str, Variant]:
    """The variants of one precision setting, frozen base first (the reference of the ratios)."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    variants: dict[str, Variant] = {"frozen_base": Variant(build_base(shape, dtype, device, checkpointing), None, True)}

    def pica_model(autocast_adapter_dtype: bool) -> tuple[nn.Module, torch.optim.Optimizer]:
        config = pica.PiCaConfig(rank=shape.rank, target_modules=TARGETS)
        model = peft.get_peft_model(build_base(shape, dtype, device, checkpointing), config,
                                    autocast_adapter_dtype=autocast_adapter_dtype)
        return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    model, optimizer = pica_model(True)
    for mode in PICA_MODES:  # one model: the modes only change how the same forward is computed
        variants[f"pica_{mode}"] = Variant(model, optimizer, checkpointing, pica_mode=mode)
    if precision == "bf16":
        model, optimizer = pica_model(False)
        variants["pica_factored_bf16_adapter"] = Variant(model, optimizer, checkpointing, pica_mode="factored")
    for rank in shape.lora_ranks:
        config = peft.LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=TARGETS)
        model = peft.get_peft_model(build_base(shape, dtype, device, checkpointing), config)
        variants[f"lora_r{rank}"] = Variant(
            model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3), checkpointing)
    return variants


def pica_layers(model: nn.Module) -> list[nn.Module]:
    """The PiCa tuner layers of ``model`` (modules carrying ``pica_forward_mode``)."""
    return [module for module in model.modules() if hasattr(module, "pica_forward_mode")]


def make_step(variant: Variant, batch: dict[str, torch.Tensor], precision: str,
              device: torch.device) -> Callable[[], None]:
    """One training step of ``variant`` on ``batch`` (forward, loss, backward, AdamW, zero_grad)."""
    model = variant.model
    layers = pica_layers(model) if variant.pica_mode else []
    embedding = model.get_input_embeddings()

    def autocast() -> contextlib.AbstractContextManager:
        if precision == "autocast_bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step() -> None:
        for layer in layers:
            layer.pica_forward_mode = variant.pica_mode
        with autocast():
            if variant.input_grad and not variant.optimizer:  # frozen base: gradient w.r.t. the embedding output
                embeds = embedding(batch["input_ids"]).detach().requires_grad_()  # (batch, seq, hidden)
                loss = model(inputs_embeds=embeds, labels=batch["labels"]).loss
            else:
                loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        loss.backward()
        if variant.optimizer is not None:
            variant.optimizer.step()
            variant.optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    return step


def resident_bytes(variant: Variant) -> int:
    """Bytes of the distinct storages of the model's parameters and buffers and of the AdamW state."""
    storages: dict[int, int] = {}
    tensors = list(variant.model.parameters()) + list(variant.model.buffers())
    if variant.optimizer is not None:
        tensors += [value for state in variant.optimizer.state.values() for value in state.values()
                    if isinstance(value, torch.Tensor)]
    for tensor in tensors:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def step_peak_bytes(step: Callable[[], None], device: torch.device) -> int:
    """Peak bytes allocated above the resident ones during one call of ``step`` (see module docstring)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        return torch.cuda.max_memory_allocated(device) - before
    with PeakTensorMemory() as tracker:
        step()
    return tracker.peak


@contextlib.contextmanager
def form_probe(variant: Variant, precision: str, device: torch.device) -> Iterator[dict[str, str]]:
    """Record which form (merged / factored) the first PiCa layer computes during the enclosed step."""
    found: dict[str, str] = {}
    layers = pica_layers(variant.model) if variant.pica_mode else []
    if not layers:
        yield found
        return
    layer = layers[0]

    def hook(module: nn.Module, args: tuple) -> None:
        merged = module.pica_forward_mode == "auto" and merged_form_applies(
            args[0], module.get_base_layer(), module.get_update("default"), module.pica_P["default"])
        found["form_used"] = "merged" if merged else "factored"

    handle = layer.register_forward_pre_hook(hook)
    try:
        yield found
    finally:
        handle.remove()


def run_precision(shape: Shape, precision: str, device: torch.device, rounds: int, warmup: int,
                  checkpointing: bool) -> dict[str, Any]:
    """Build, warm up, measure memory and time every variant of one precision setting."""
    variants = build_variants(shape, precision, device, checkpointing)
    logger.info("%s: %d variants built", precision, len(variants))
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq), generator=generator).to(device)  # (batch, seq)
    batch = {"input_ids": ids, "labels": ids.clone()}
    steps = {name: make_step(variant, batch, precision, device) for name, variant in variants.items()}
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    results: dict[str, dict[str, Any]] = {}
    for name in names:  # one more untimed step each: memory, and the form the PiCa layers take
        with form_probe(variants[name], precision, device) as probe:
            peak = step_peak_bytes(steps[name], device)
        resident = resident_bytes(variants[name])
        trainable = sum(p.numel() for p in variants[name].model.parameters() if p.requires_grad)
        results[name] = {"trainable_parameters": trainable, **probe,
                         "memory_mib": {"resident": round(resident / 2**20, 2), "step_peak_above_resident":
                                        round(peak / 2**20, 2), "total": round((resident + peak) / 2**20, 2)}}
    logger.info("%s: %d timed rounds", precision, rounds)
    timed = interleaved_medians(steps, repeats=rounds, warmup=0)  # frozen_base first: the paired reference
    tokens = shape.batch * shape.seq
    for name in names:
        samples = timed[name]["samples_s"]
        results[name].update({
            "median_s": round(timed[name]["median_s"], 5), "tokens_per_s": round(tokens / timed[name]["median_s"], 2),
            "ratio_to_base": round(timed[name]["median_paired_ratio"], 4), "samples_s": samples})
        if name.startswith("pica_"):  # > 1: faster than factored (factored time / this time, paired)
            results[name]["speedup_over_factored"] = round(statistics.median(
                f / t for f, t in zip(timed["pica_factored"]["samples_s"], samples)), 4)
    del variants, steps
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse arguments, run every precision setting, print (and optionally write) the JSON result."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=["auto", *PRESETS], default="auto",
                        help="shapes: gemma2b on CUDA, cpu otherwise (auto); quick = --quick")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 2 rounds, 1 warm-up round")
    for name in ("layers", "batch", "seq", "rank", "hidden", "intermediate", "heads", "kv-heads", "head-dim", "vocab"):
        parser.add_argument(f"--{name}", type=int, default=None, help="override the preset")
    parser.add_argument("--lora-ranks", type=int, nargs="+", default=None, help="override the preset")
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 5 on CUDA, 3 on CPU)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds before the memory step")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logger.setLevel(logging.INFO)  # progress on stderr
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    preset = "quick" if args.quick else args.preset
    if preset == "auto":
        preset = "gemma2b" if device.type == "cuda" else "cpu"
    shape = Shape(**asdict(PRESETS[preset]))
    for name in ("layers", "batch", "seq", "rank", "hidden", "intermediate", "heads", "kv_heads", "head_dim", "vocab",
                 "lora_ranks"):
        if getattr(args, name) is not None:
            setattr(shape, name, getattr(args, name))
    rounds = args.rounds or (2 if args.quick else 5 if device.type == "cuda" else 3)
    machine = machine_info()
    started = time.perf_counter()
    settings = {precision: run_precision(shape, precision, device, rounds, args.warmup, args.gradient_checkpointing)
                for precision in args.precisions}
    result = {
        "benchmark": "train_throughput",
        "preset": preset,
        "shape": asdict(shape),
        "tokens_per_step": shape.batch * shape.seq,
        "targets": TARGETS,
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "gradient_checkpointing": args.gradient_checkpointing,
        "rounds": rounds,
        "warmup_rounds": args.warmup,
        "step": "forward (GemmaForCausalLM, cross-entropy on random labels) + backward + AdamW.step + "
                "zero_grad(set_to_none=True); frozen base: embedding output requires grad, no optimizer",
        "precision_settings": {"fp32": "fp32 weights", "autocast_bf16": "fp32 weights under torch.autocast(bf16)",
                               "bf16": "bf16 weights (adapters fp32 unless named bf16_adapter)"},
        "ratio_definition": "median over rounds of variant time / frozen_base time in the same round "
                            "(speedup_over_factored: median of pica_factored time / variant time)",
        "memory_method": ("CUDA max_memory_allocated above memory_allocated before one step" if device.type == "cuda"
                          else "CPU: peak live bytes of tensors created by aten ops during one step "
                               "(TorchDispatchMode, _common.PeakTensorMemory)")
                         + "; resident: parameters, buffers, AdamW state (distinct storages)",
        "results": settings,
        "wall_s": round(time.perf_counter() - started, 1),
        "versions": {"transformers": transformers.__version__, "peft": peft.__version__, "pica": pica.__version__},
        "machine": machine,
        "load_average_at_end": list(os.getloadavg()),
    }
    for precision in settings.values():
        for entry in precision.values():
            assert math.isfinite(entry["ratio_to_base"]) and entry["ratio_to_base"] > 0
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
