"""One training step (forward + backward) of one PiCa layer vs the frozen base, the factored
reference and PEFT LoRA at the same rank. Prints one JSON object.

    python benchmarks/step_time.py [--tokens 2048] [--features 2048] [--rank 256] [--repeats 9]

Every variant: fp32, ``x`` requires grad (as inside a network), ``y.backward(g)`` with a fixed ``g``.
Variants are interleaved round by round; medians and ratios to the base are reported. Peak memory:
peak live bytes of the tensors created during one step (forward activations, transients, gradients),
tracked per aten op by ``_common.PeakTensorMemory``; weights and inputs existing before are excluded.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleaved_medians, machine_info, peak_tensor_bytes, saved_for_backward_bytes  # noqa: E402

import peft  # noqa: E402

import pica  # noqa: E402
from pica.tuner.layer import merged_form_applies  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--features", type=int, default=2048)
    parser.add_argument("--rank", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    d, n, r = args.features, args.tokens, args.rank

    base = nn.Sequential()
    base.add_module("proj", nn.Linear(d, d, bias=False))
    base.requires_grad_(False)
    weight = base.proj.weight  # (d, d)
    pica_model = peft.get_peft_model(base, pica.PiCaConfig(rank=r, target_modules=["proj"]))
    layer = pica_model.base_model.model.proj
    with torch.no_grad():
        layer.get_update("default").normal_(0, 0.02)  # (d, r) a trained-looking M
    projector, update = layer.pica_P["default"], layer.get_update("default")

    lora_base = nn.Sequential()
    lora_base.add_module("proj", nn.Linear(d, d, bias=False))
    with torch.no_grad():
        lora_base.proj.weight.copy_(weight)
    lora = peft.get_peft_model(lora_base, peft.LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, target_modules=["proj"]))
    with torch.no_grad():
        for name, parameter in lora.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.02)

    x = torch.randn(n, d, requires_grad=True)  # (N, d)
    grad_out = torch.randn(n, d)  # (N, d)

    def step(forward):
        def run() -> None:
            x.grad = None
            update.grad = None
            for parameter in lora.parameters():
                parameter.grad = None
            forward(x).backward(grad_out)
        return run

    def with_mode(mode):
        def forward(inputs):
            layer.pica_forward_mode = mode
            return layer(inputs)
        return forward

    forwards = {
        "frozen_base": lambda inputs: torch.nn.functional.linear(inputs, weight),
        "factored_reference": lambda inputs: torch.nn.functional.linear(inputs, weight) + (inputs @ projector.T) @ update.T,
        "pica_default_auto": with_mode("auto"),
        "pica_factored": with_mode("factored"),
        "peft_lora": lambda inputs: lora(inputs),
    }
    variants = {name: step(forward) for name, forward in forwards.items()}
    layer.pica_forward_mode = "auto"
    auto_form = "merged" if merged_form_applies(x, layer.get_base_layer(), update, layer.pica_P["default"]) else "factored"
    timings = interleaved_medians(variants, repeats=args.repeats)
    memory = {name: peak_tensor_bytes(run) for name, run in variants.items()}
    saved = {name: saved_for_backward_bytes(lambda forward=forward: forward(x)) for name, forward in forwards.items()}
    base_time = timings["frozen_base"]["median_s"]
    result = {
        "benchmark": "step_time",
        "shape": {"tokens": n, "in_features": d, "out_features": d, "rank": r, "dtype": "float32",
                  "input_requires_grad": True},
        "auto_form_chosen": auto_form,
        "median_s": {name: round(t["median_s"], 5) for name, t in timings.items()},
        "ratio_to_base": {name: round(t["median_s"] / base_time, 3) for name, t in timings.items()},
        "median_paired_ratio_to_base": {name: round(t["median_paired_ratio"], 3) for name, t in timings.items()},
        "peak_tensor_mib": {name: round(b / 2**20, 2) for name, b in memory.items()},
        "saved_for_backward_mib": {name: round(b / 2**20, 2) for name, b in saved.items()},
        "memory_method": "peak: live bytes of tensors created by aten ops during one step (TorchDispatchMode "
                         "counting output storages until freed), excludes weights and the input; saved: distinct "
                         "storages autograd keeps from forward to backward (saved_tensors_hooks; the input and the "
                         "frozen weight count when saved), i.e. what each such layer holds in a network",
        "repeats": args.repeats,
        "samples_s": {name: t["samples_s"] for name, t in timings.items()},
        "theory_extra_flops_over_base": {
            "factored": round(2.5 * r / d, 3), "merged": round(r / d + r / n, 3)},
        "machine": machine_info(),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
