"""GPU correctness check (not a test; needs CUDA): projector/fingerprint agreement CPU vs GPU,
GPU-saved adapter reloaded on CPU, a few bf16 training steps on GPU. Prints one JSON object.

Run: python benchmarks/gpu_check.py
"""

from __future__ import annotations

import json
import platform
import sys
import tempfile
import time

import torch
from peft import PeftModel, get_peft_model

sys.path.insert(0, ".")
from pica import PiCaConfig  # noqa: E402
from pica.fingerprint import fingerprint_distance, weight_fingerprint  # noqa: E402
from pica.projector import top_right_singular_vectors  # noqa: E402
from tests.conftest import example_inputs, make_llama, model_output, pica_layers, randomize_updates  # noqa: E402


def main() -> None:
    assert torch.cuda.is_available(), "needs a CUDA device"
    report: dict = {"command": "python benchmarks/gpu_check.py", "torch": torch.__version__,
                    "device": torch.cuda.get_device_name(), "python": platform.python_version()}
    # 1. projector and fingerprint: CPU vs GPU on the same weights
    generator = torch.Generator().manual_seed(0)
    shapes = [(256, 256), (1024, 256), (256, 2048), (2048, 512)]
    sign_flips, max_diff, max_fp = 0, 0.0, 0.0
    for shape in shapes:
        weight = torch.randn(*shape, generator=generator)
        rank = min(shape) // 4
        cpu = top_right_singular_vectors(weight, rank, torch.float64)
        gpu = top_right_singular_vectors(weight.cuda(), rank, torch.float64).cpu()
        sign_flips += int(((cpu * gpu).sum(dim=1) < 0).sum())
        max_diff = max(max_diff, float((cpu - gpu).abs().max()))
        max_fp = max(max_fp, fingerprint_distance(weight_fingerprint(weight), weight_fingerprint(weight.cuda())))
    report["projector_cpu_vs_gpu"] = {"shapes": shapes, "fp64_sign_flips": sign_flips,
                                      "fp64_max_abs_diff": max_diff, "fingerprint_max_distance": max_fp}
    # 2. adapter built and saved on GPU, reloaded on CPU
    model = get_peft_model(make_llama().cuda(), PiCaConfig(rank=4))
    randomize_updates(model)
    inputs = example_inputs("llama")
    gpu_logits = model_output(model, {k: v.cuda() for k, v in inputs.items()}).cpu()
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        reloaded = PeftModel.from_pretrained(make_llama(), directory)
        cpu_logits = model_output(reloaded, inputs)
    report["gpu_saved_cpu_loaded_max_abs_logit_diff"] = float((gpu_logits - cpu_logits).abs().max())
    # 3. bf16 training steps on GPU
    model = get_peft_model(make_llama().cuda().to(torch.bfloat16), PiCaConfig(rank=4))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = {k: v.cuda() for k, v in inputs.items()}
    losses = []
    for _ in range(20):
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    layers = list(pica_layers(model).values())
    report["bf16_training"] = {
        "loss_first": losses[0], "loss_last": losses[-1],
        "m_dtypes": sorted({str(layer.get_update("default").dtype) for layer in layers}),
        "distinct_trainable_tensors": len([p for p in model.parameters() if p.requires_grad]),
    }
    # 4. projector time on one Gemma-2B-shaped down_proj (2048x16384), rank 256, GPU fp32
    weight = torch.randn(2048, 16384, device="cuda")
    top_right_singular_vectors(weight, 256)
    torch.cuda.synchronize()
    started = time.perf_counter()
    top_right_singular_vectors(weight, 256)
    torch.cuda.synchronize()
    ours = time.perf_counter() - started
    started = time.perf_counter()
    torch.linalg.svd(weight, full_matrices=False)
    torch.cuda.synchronize()
    full = time.perf_counter() - started
    report["gemma2b_down_proj_rank256_seconds"] = {"pica_projector": round(ours, 4), "full_svd_fp32": round(full, 4)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
