"""``get_peft_model`` wall time on 2 ranks with and without sharing the projector work. Prints one JSON object.

    PYTHONPATH=src python benchmarks/projector_sharing.py [--layers 4] [--rank 256] [--rounds 2] [--out FILE]

Launches itself with ``torch.distributed.run --nproc_per_node=2`` (gloo, CPU, ``OMP_NUM_THREADS=1``: one
thread per rank). Every rank builds the same Gemma-2B-shaped stack (the PiCa targets q/k/v/up/down of
``benchmarks/projector_init.py``'s ``GemmaTargets``, fp32, N(0, 0.02), seed 0; at most 4 layers: two copies
of 18 layers do not fit in 24 GB) and runs ``get_peft_model(model, PiCaConfig(rank=...))`` with sharing off
(``pica.projector_sharing.projector_sharing(False)``: every rank computes every projector) and on (each rank
a share, exchanged by broadcast), alternating the order each round. Timed from a barrier to a barrier after
the call (what the job waits for), plus each rank's own time. Also: whether every ``P`` is bitwise the same
with and without sharing, on every rank, and how many projectors each rank computed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info  # noqa: E402

MAX_LAYERS = 4


def _launch(args: argparse.Namespace) -> dict:
    """Run this script on 2 ranks and return rank 0's JSON."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PICA_BENCH_RANK_MODE": "1",
           "PYTHONPATH": os.pathsep.join([str(root / "src"), os.environ.get("PYTHONPATH", "")])}
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "rank0.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                   str(Path(__file__).resolve()), "--layers", str(args.layers), "--rank", str(args.rank),
                   "--rounds", str(args.rounds), "--out", str(out)]
        subprocess.run(command, cwd=root, env=env, check=True)
        return json.loads(out.read_text())


def _ranks(args: argparse.Namespace) -> None:
    """One rank's part: build, time both modes per round, gather to rank 0."""
    import torch.distributed as dist
    from peft import get_peft_model

    import pica
    import pica.projector_sharing as sharing
    from pica.tuner.layer import pica_layers
    from projector_init import TARGETS, GemmaTargets

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    here, world = dist.get_rank(), dist.get_world_size()
    original = sharing.top_right_singular_vectors_many
    counts: list[int] = []

    def counted(weights, *rest, **kwargs):
        counts.append(len(weights))
        return original(weights, *rest, **kwargs)

    sharing.top_right_singular_vectors_many = counted
    rounds, projectors = [], {}
    for index in range(args.rounds):
        record = {}
        for mode in (("off", "on") if index % 2 == 0 else ("on", "off")):
            model = GemmaTargets(args.layers)  # not timed
            counts.clear()
            dist.barrier()
            start = time.perf_counter()
            with sharing.projector_sharing(mode == "on"):
                peft_model = get_peft_model(model, pica.PiCaConfig(rank=args.rank, target_modules=TARGETS))
            own = time.perf_counter() - start
            dist.barrier()
            wall = time.perf_counter() - start
            got = {name: layer.pica_P["default"].clone() for name, layer in pica_layers(peft_model)}
            if index == 0:
                projectors[mode] = got
            record[mode] = {"wall_s": wall, "own_s": own, "computed_here": sum(counts)}
            del model, peft_model, got
        rounds.append(record)
    same = set(projectors["on"]) == set(projectors["off"]) and all(
        torch.equal(projectors["on"][name], projectors["off"][name]) for name in projectors["off"])
    gathered: list = [None] * world
    dist.all_gather_object(gathered, {"rounds": rounds, "P_bitwise_same_on_and_off": same,
                                      "projectors": len(projectors["off"])})
    if here == 0:
        Path(args.out).write_text(json.dumps(gathered))
    dist.barrier()
    dist.destroy_process_group()


def _summarise(per_rank: list[dict], args: argparse.Namespace) -> dict:
    rounds = len(per_rank[0]["rounds"])
    wall = {mode: [per_rank[0]["rounds"][i][mode]["wall_s"] for i in range(rounds)] for mode in ("off", "on")}
    ratios = [wall["on"][i] / wall["off"][i] for i in range(rounds)]
    return {
        "benchmark": "projector_sharing",
        "model": f"Gemma-2B-shaped PiCa targets (q/k/v/up/down), {args.layers} layers, fp32, N(0, 0.02), same on both ranks",
        "rank": args.rank,
        "processes": len(per_rank),
        "threads_per_process": 1,
        "what": "get_peft_model wall time, barrier to barrier on rank 0; 'off': every rank computes every "
                "projector; 'on': each rank computes a share, exchanged by broadcast",
        "wall_s": {mode: {"median": statistics.median(values), "all": values} for mode, values in wall.items()},
        "ratio_on_over_off": {"median": statistics.median(ratios), "all": ratios},
        "speedup_off_over_on": 1.0 / statistics.median(ratios),
        "per_rank": [{"own_s": {mode: [r[mode]["own_s"] for r in rank["rounds"]] for mode in ("off", "on")},
                      "computed_here": {mode: rank["rounds"][0][mode]["computed_here"] for mode in ("off", "on")}}
                     for rank in per_rank],
        "projectors_per_rank": per_rank[0]["projectors"],
        "P_bitwise_same_on_and_off_every_rank": all(rank["P_bitwise_same_on_and_off"] for rank in per_rank),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=MAX_LAYERS)
    parser.add_argument("--rank", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()
    if not 1 <= args.layers <= MAX_LAYERS:
        parser.error(f"--layers must be in [1, {MAX_LAYERS}] (two copies must fit in memory)")
    if os.environ.get("PICA_BENCH_RANK_MODE") == "1":
        _ranks(args)
        return
    info = machine_info()
    info["torch_threads"] = "1 per rank (OMP_NUM_THREADS=1, torch.set_num_threads(1)); this launcher is not timed"
    result = {**_summarise(_launch(args), args), "machine": info, "load_average_at_end": os.getloadavg()}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
