"""Many adapters on one base (issue 29): memory and load time of 1, 10 and 50 adapters, and the tokens/s of a
mixed batch over 16 adapters, PiCa (``full`` and ``compact`` files) against PEFT LoRA r32 on the same targets.

    PYTHONPATH=src python benchmarks/many_adapters.py                   # Gemma-2B-shaped, 2 layers
    PYTHONPATH=src python benchmarks/many_adapters.py --layers 4 --out benchmarks/results/many_adapters.json
    PYTHONPATH=src python benchmarks/many_adapters.py --quick           # tiny shapes (the suite runs this)

The base: ``GemmaForCausalLM`` with Gemma-2B's layer shapes (hidden 2048, MLP 16384, 8 query heads, one KV
head of 256) and random weights, ``--layers`` decoder layers; targets q, k, v, up, down. One adapter of each
kind is trained for no step but given random ``M`` (LoRA: random ``B``) and saved once; it is then loaded N
times under N names (a server holding N users' adapters). Memory is exact and machine-independent: the
bytes of the distinct storages of every adapter tensor (``M``, ``P``, fingerprints; LoRA's ``A``, ``B``)
reachable from the model; "per additional adapter" is (bytes at N − bytes at 1) / (N − 1). Load time is
the median over the loads of each count after the first. The mixed batch: ``--batch`` rows, row ``i``
served by adapter ``i mod 16``, ``--seq`` tokens, one forward under ``torch.no_grad()``; PiCa and LoRA
timed in paired rounds, order rotated (``_common.interleaved_medians``); the ratio is LoRA's time over
PiCa's (> 1: PiCa faster).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, interleaved_medians, machine_info  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import GemmaConfig, GemmaForCausalLM  # noqa: E402

import pica  # noqa: E402,F401  (registers PiCa with peft)
from pica import PiCaConfig  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


def base_model(layers: int, quick: bool) -> GemmaForCausalLM:
    """A Gemma-2B-shaped decoder stack (or a tiny one with ``quick``), random weights, seed 0."""
    torch.manual_seed(0)
    shape = (dict(hidden_size=64, intermediate_size=256, num_attention_heads=4, num_key_value_heads=1, head_dim=16)
             if quick else dict(hidden_size=2048, intermediate_size=16384, num_attention_heads=8,
                                num_key_value_heads=1, head_dim=256))
    config = GemmaConfig(vocab_size=256, num_hidden_layers=layers, max_position_embeddings=512, **shape)
    return GemmaForCausalLM(config).eval()


def adapter_bytes(model: torch.nn.Module) -> int:
    """Bytes of the distinct storages of every adapter tensor in ``model`` (PiCa: ``M``, ``P``, fingerprints;
    LoRA: ``A``, ``B``), each storage counted once however many adapters view it."""
    seen: dict[int, int] = {}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if any(part in name for part in ("pica_M", "pica_P", "pica_fingerprint", "lora_A", "lora_B")):
            storage = tensor.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def save_adapter(kind: str, directory: Path, layers: int, quick: bool, rank: int, lora_rank: int) -> None:
    """Write one adapter of ``kind`` (``pica_full``, ``pica_compact``, ``lora``) with random trained weights."""
    if kind == "lora":
        config = LoraConfig(r=lora_rank, lora_alpha=lora_rank, target_modules=TARGETS, init_lora_weights=False)
    else:
        config = PiCaConfig(rank=rank, target_modules=TARGETS, init_weights=False,
                            projector_storage=kind.removeprefix("pica_"))
    get_peft_model(base_model(layers, quick), config).save_pretrained(directory)


def load_many(kind: str, directory: Path, counts: list[int], layers: int, quick: bool) -> dict:
    """Load the adapter in ``directory`` max(counts) times under new names; memory at each count, load times."""
    model = base_model(layers, quick)
    start = time.perf_counter()
    model = PeftModel.from_pretrained(model, directory, adapter_name="a0")
    times = [time.perf_counter() - start]
    memory = {1: adapter_bytes(model)}
    for index in range(1, max(counts)):
        start = time.perf_counter()
        model.load_adapter(directory, adapter_name=f"a{index}")
        times.append(time.perf_counter() - start)
        if index + 1 in counts:
            memory[index + 1] = adapter_bytes(model)
    one = memory[1]
    return {
        "adapter_mib": {str(n): round(b / 2**20, 2) for n, b in memory.items()},
        "per_additional_adapter_mib": {str(n): round((b - one) / (n - 1) / 2**20, 3) for n, b in memory.items() if n > 1},
        "first_load_s": round(times[0], 3),
        "median_later_load_s": round(statistics.median(times[1:]), 4) if len(times) > 1 else None,
        "model": model,
    }


def m_bytes(model: torch.nn.Module, adapter: str) -> int:
    """Bytes of one PiCa adapter's ``M`` (its groups' parameters)."""
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if f"pica_M.{adapter}." in n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rank", type=int, default=256)
    parser.add_argument("--lora-rank", type=int, default=32)
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 10, 50])
    parser.add_argument("--mixed-adapters", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, counts 1 3 5, 4 mixed adapters")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.quick:
        args.rank, args.lora_rank, args.counts, args.mixed_adapters, args.repeats = 8, 2, [1, 3, 5], 4, 2
        args.batch, args.seq = 4, 8
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    result: dict = {"benchmark": "many_adapters", "layers": args.layers, "rank": args.rank, "lora_rank": args.lora_rank,
                    "targets": TARGETS, "quick": args.quick, "loads": {}}
    models = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("pica_full", "pica_compact", "lora"):
            directory = Path(tmp) / kind
            save_adapter(kind, directory, args.layers, args.quick, args.rank, args.lora_rank)
            file_mib = sum(f.stat().st_size for f in directory.iterdir() if f.suffix == ".safetensors") / 2**20
            loaded = load_many(kind, directory, sorted(set(args.counts)), args.layers, args.quick)
            models[kind] = loaded.pop("model")
            result["loads"][kind] = {"file_mib": round(file_mib, 2), **loaded}
    m_mib = m_bytes(models["pica_full"], "a0") / 2**20
    result["pica_m_mib"] = round(m_mib, 3)
    for kind in ("pica_full", "pica_compact"):
        worst = max(result["loads"][kind]["per_additional_adapter_mib"].values())
        result["loads"][kind]["per_additional_over_m"] = round(worst / m_mib, 3)
    del models["pica_compact"]

    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1, 256, (args.batch, args.seq), generator=generator)
    names = [f"a{i % args.mixed_adapters}" for i in range(args.batch)]

    def forward(model):
        def run():
            with torch.no_grad():
                model(input_ids=input_ids, adapter_names=names)
        return run

    timings = interleaved_medians({"pica": forward(models["pica_full"]), "lora": forward(models["lora"])},
                                  repeats=args.repeats)
    tokens = args.batch * args.seq
    result["mixed_batch"] = {
        "adapters": args.mixed_adapters, "rows": args.batch, "tokens": tokens,
        "tokens_per_s": {name: round(tokens / t["median_s"], 1) for name, t in timings.items()},
        "lora_time_over_pica": round(timings["lora"]["median_paired_ratio"], 3),  # paired rounds; > 1: PiCa faster
        "samples_s": {name: t["samples_s"] for name, t in timings.items()},
    }
    result["machine"] = machine_info()
    emit(result, args.out)


if __name__ == "__main__":
    main()
